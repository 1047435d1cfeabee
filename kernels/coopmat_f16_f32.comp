#version 450
// coopmat: f16 weights, f32 activations, fp16 matrix units (see coopmat_main.glsl).
#define COOPMAT
#extension GL_GOOGLE_include_directive : require
#include "matmul_io.glsl"
#include "f16.glsl"
#include "coopmat_main.glsl"
