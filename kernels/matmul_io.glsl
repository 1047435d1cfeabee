// Declarations of the matrix products (matvec_*.comp, matmul_*.comp, coopmat_*.comp): weights in 32-element
// blocks, float32 activations. y[tok, row] (+)= sum_k W[row, k] * x[tok, k] for NR weight rows and NT tokens per
// workgroup (coopmat: BT tokens, specialised).
#extension GL_EXT_control_flow_attributes : require
// Rows and tokens per workgroup are constants, so that every per-row array stays in registers (loops over them
// are unrolled); the threads per workgroup, matvec's rows and the pair are specialised (the driver unrolls).
#if defined(COOPMAT)
const uint NR = 64;                            // on the matrix units (vulkan.py: COOP_ROWS)
#elif defined(MATMUL)
const uint NR = 2;                             // weight rows per workgroup
const uint NT = 8;                             // tokens per workgroup (prompt processing)
#else
layout(constant_id = 3) const uint NR = 4;     // matrix-vector (decode): weight rows per workgroup (1, 2, 4, 8, 16
                                               // or 32: a 32-row block of QUANTIZE is whole workgroups)
const uint NT = 1;
#endif
layout(constant_id = 1) const uint PAIR = 0;   // 1: the same rows of W and W2 (ffn_gate, ffn_up) in one pass,
                                               // y = silu(W x) * (W2 x): SwiGLU's SiLU-multiply fused
const uint NW = NR * (PAIR + 1);               // weight rows each thread holds
layout(constant_id = 2) const uint UB = 1;     // blocks of each row a thread loads at once

layout(push_constant) uniform Push {
    uint rows;      // weight rows
    uint nb;        // 32-element blocks per row (columns padded with zeros to a multiple of 32)
    uint x_stride;  // floats between tokens of x (a multiple of 32; padding columns are zero; INT8: elements)
    uint x_off;     // float offset of token 0 in x (a multiple of 4; INT8: 0)
    uint y_stride;  // floats between tokens of y
    uint y_off;     // float offset of token 0, row 0 in y
    uint n;         // tokens
    uint groups;    // workgroups of rows: ceil(rows / NR), laid out over x and z of the grid
    uint bias_off;  // index of row 0's bias in bias[]
    uint flags;     // bit 0: y += result (the residual stream), else y = result; bit 1: + bias[bias_off + row];
                    // bit 2 (NORM): x is RMSNorm's input times its weight, and the result is scaled by
                    //   rsqrt(sum(ss[0..ss_count)) / dim + eps): the sum of squares comes from its producer;
                    // bit 3 (PRODUCE, matvec): also write xg = y * g (the next RMSNorm's input) and ss[group] =
                    //   the sum of y^2 over this workgroup's rows: RMSNorm without a pass of its own;
                    // bit 4 (QUANTIZE, one-token matvec, --activations int8): also round what it finished (xg with
                    //   PRODUCE, else y) to 8 bits for the next product, as quantize_f32 does (matmul_main.glsl)
    uint ss_count;  // NORM: partial sums of squares to add up
    float inv_dim;  // NORM: 1 / elements of the normalised row
    float eps;      // NORM: RMSNorm's epsilon
} p;

#include "block_scale.glsl"
layout(std430, binding = 0) readonly buffer Weights { uvec4 w[]; };  // blocks, row-major, UV uvec4 per block
layout(std430, binding = 1) readonly buffer Scales { uint d[]; };    // Q8_0 / Q4_0: fp16 scale per block, 2 a uint;
                                                                     // q4m / q5m / q6 / q4k / q5k: the type's META words
#ifdef INT8  // matvec_*_i8: the activations as quantize_f32 writes them, 8 bits each, a scale per 32-element block
layout(std430, binding = 2) readonly buffer Xin { uvec4 xq[]; };      // a block's 32 int8 in two uvec4
layout(std430, binding = 10) readonly buffer XScales { vec2 xd[]; };  // a block's (d, the sum of its integers)
#else
layout(std430, binding = 2) readonly buffer Xin { vec4 x[]; };
#endif
layout(std430, binding = 3) readonly buffer Bias { float bias[]; };
layout(std430, binding = 4) coherent buffer Yout { float y[]; };  // (coherent: QUANTIZE reads other workgroups')
layout(std430, binding = 5) readonly buffer Weights2 { uvec4 w2[]; };  // PAIR: the second matrix
layout(std430, binding = 6) readonly buffer Scales2 { uint d2[]; };
layout(std430, binding = 7) buffer SumSquares { float ss[]; };        // NORM reads, PRODUCE writes
layout(std430, binding = 8) readonly buffer NormWeight { float gnext[]; };  // PRODUCE: the next RMSNorm's weight
layout(std430, binding = 9) coherent buffer NormInput { float xg[]; };  // PRODUCE: y * g
#if !defined(MATMUL) && !defined(COOPMAT)  // matvec, flag QUANTIZE: what it finished, rounded for the next product
layout(std430, binding = 11) writeonly buffer Yq { uint yq[]; };    // as quantize_f32's xq
layout(std430, binding = 12) writeonly buffer Yd { vec2 yd[]; };    // ... its xd
layout(std430, binding = 13) writeonly buffer Yr { float yr[]; };   // ... its rounded floats
layout(std430, binding = 14) coherent buffer Counts { uint counts[]; };  // per 32-row block: workgroups done
#endif

