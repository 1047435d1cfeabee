#version 450
// matmul: q2 weights, f32 activations (see matmul_main.glsl).
#define MATMUL
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "matmul_io.glsl"
#include "q2.glsl"
#include "matmul_main.glsl"
