#version 450
// coopmat: q5m weights, f32 activations, fp16 matrix units (see coopmat_main.glsl).
#define COOPMAT
#extension GL_GOOGLE_include_directive : require
#include "matmul_io.glsl"
#include "q5m.glsl"
#include "coopmat_main.glsl"
