#version 450
// matmul: iq4nl weights, f32 activations (see matmul_main.glsl).
#define MATMUL
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "matmul_io.glsl"
#include "iq4nl.glsl"
#include "matmul_main.glsl"
