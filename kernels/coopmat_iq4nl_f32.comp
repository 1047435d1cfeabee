#version 450
// coopmat: iq4nl weights, f32 activations, fp16 matrix units (see coopmat_main.glsl).
#define COOPMAT
#extension GL_GOOGLE_include_directive : require
#include "matmul_io.glsl"
#include "iq4nl.glsl"
#define INTW  // integers q staged as fp16, scales (and mins) applied as the products are summed (coopmat_main.glsl)
#include "coopmat_main.glsl"
