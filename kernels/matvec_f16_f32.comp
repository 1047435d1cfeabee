#version 450
// matvec: f16 weights, f32 activations (see matmul_main.glsl).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "matmul_io.glsl"
#include "f16.glsl"
#include "matmul_main.glsl"
