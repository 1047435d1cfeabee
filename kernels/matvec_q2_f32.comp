#version 450
// matvec: q2 weights, f32 activations (see matmul_main.glsl).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "matmul_io.glsl"
#include "q2.glsl"
#include "matmul_main.glsl"
