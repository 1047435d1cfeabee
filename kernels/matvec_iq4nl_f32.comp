#version 450
// matvec: iq4nl weights, f32 activations (see matmul_main.glsl).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "matmul_io.glsl"
#include "iq4nl.glsl"
#include "matmul_main.glsl"
