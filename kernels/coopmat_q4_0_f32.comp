#version 450
// coopmat: q4_0 weights, f32 activations, fp16 matrix units (see coopmat_main.glsl).
#define COOPMAT
#extension GL_GOOGLE_include_directive : require
#include "matmul_io.glsl"
#include "q4_0.glsl"
#define INTW  // integers q staged as fp16, scales (and mins) applied as the products are summed (coopmat_main.glsl)
#define STEP_BLOCKS 2  // two blocks a step (kernels/README: 1.13-1.15x a 7B prompt), one for each group of subgroups
#define KSPLIT 2
#include "coopmat_main.glsl"
