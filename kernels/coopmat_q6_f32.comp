#version 450
// coopmat: q6 weights, f32 activations, fp16 matrix units (see coopmat_main.glsl).
#define COOPMAT
#extension GL_GOOGLE_include_directive : require
#include "matmul_io.glsl"
#include "q6.glsl"
#include "coopmat_main.glsl"
