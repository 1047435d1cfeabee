#version 450
// coopmat: q8_0 weights, f32 activations, fp16 matrix units (see coopmat_main.glsl).
#define COOPMAT
#extension GL_GOOGLE_include_directive : require
#include "matmul_io.glsl"
#include "q8_0.glsl"
#define STEP_BLOCKS 2  // two blocks a step, one for each group of subgroups (KSPLIT)
#define KSPLIT 2
#define INTW  // integers q staged as fp16, scales (and mins) applied as the products are summed (coopmat_main.glsl)
#include "coopmat_main.glsl"
