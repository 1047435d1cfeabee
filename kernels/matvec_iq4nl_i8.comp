#version 450
// matvec: iq4nl weights, 8-bit activations (--activations int8; see matmul_main.glsl).
#extension GL_GOOGLE_include_directive : require
#define INT8
#include "common.glsl"
#include "int8.glsl"
#include "matmul_io.glsl"
#include "iq4nl.glsl"
#include "matmul_main.glsl"
