#version 450
// coopmat: iq4nl weights, 8-bit activations (--activations int8), 8-bit matrix units (see coopmat_main.glsl).
#define COOPMAT
#define INT8
#extension GL_GOOGLE_include_directive : require
#include "int8.glsl"
#include "matmul_io.glsl"
#include "iq4nl.glsl"
#define INTW  // integers q, scales (and mins) applied as the products are summed (coopmat_main.glsl)
#include "coopmat_main.glsl"
