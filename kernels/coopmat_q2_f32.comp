#version 450
// coopmat: q2 weights, f32 activations, fp16 matrix units (see coopmat_main.glsl): its values (d sc q - dmin m)
// staged as fp16 pairs, as float weights are (a min for each 16-element half does not fit INTW's block scale and min).
#define COOPMAT
#extension GL_GOOGLE_include_directive : require
#include "matmul_io.glsl"
#include "q2.glsl"
#include "coopmat_main.glsl"
