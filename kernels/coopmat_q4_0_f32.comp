#version 450
// coopmat: q4_0 weights, f32 activations, fp16 matrix units (see coopmat_main.glsl).
#define COOPMAT
#extension GL_GOOGLE_include_directive : require
#include "matmul_io.glsl"
#include "q4_0.glsl"
#define INTW  // d * q: q staged as fp16 integers (coopmat_main.glsl)
#include "coopmat_main.glsl"
