#version 450
// matvec: q5k weights, f32 activations (see matmul_main.glsl).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "matmul_io.glsl"
#include "q5k.glsl"
#include "matmul_main.glsl"
