// Declarations of the matrix products (matvec_*.comp, matmul_*.comp, coopmat_*.comp): weights in 32-element
// blocks, float32 activations. y[tok, row] (+)= sum_k W[row, k] * x[tok, k] for NR weight rows and NT tokens per
// workgroup (coopmat: BT tokens, specialised).
#extension GL_EXT_control_flow_attributes : require
// Rows and tokens per workgroup are compile-time constants, so that every per-row array stays in registers
// (loops over them are unrolled here, not left to the driver); the threads per workgroup are specialised.
#if defined(COOPMAT)
const uint NR = 64;                            // on the matrix units (vulkan.py: COOP_ROWS)
#elif defined(MATMUL)
const uint NR = 2;                             // weight rows per workgroup
const uint NT = 8;                             // tokens per workgroup (prompt processing)
#else
const uint NR = 4;
const uint NT = 1;                             // matrix-vector (decode)
#endif
layout(constant_id = 1) const uint PAIR = 0;   // 1: the same rows of W and W2 (ffn_gate, ffn_up) in one pass,
                                               // y = silu(W x) * (W2 x): SwiGLU's SiLU-multiply fused
const uint NW = NR * (PAIR + 1);               // weight rows each thread holds
layout(constant_id = 2) const uint UB = 1;     // blocks of each row a thread loads at once

layout(push_constant) uniform Push {
    uint rows;      // weight rows
    uint nb;        // 32-element blocks per row (columns padded with zeros to a multiple of 32)
    uint x_stride;  // floats between tokens of x (a multiple of 32; padding columns are zero)
    uint x_off;     // float offset of token 0 in x (a multiple of 4)
    uint y_stride;  // floats between tokens of y
    uint y_off;     // float offset of token 0, row 0 in y
    uint n;         // tokens
    uint groups;    // workgroups of rows: ceil(rows / NR), laid out over x and z of the grid
    uint bias_off;  // index of row 0's bias in bias[]
    uint flags;     // bit 0: y += result (the residual stream), else y = result; bit 1: + bias[bias_off + row];
                    // bit 2 (NORM): x is RMSNorm's input times its weight, and the result is scaled by
                    //   rsqrt(sum(ss[0..ss_count)) / dim + eps): the sum of squares comes from its producer;
                    // bit 3 (PRODUCE, matvec): also write xg = y * g (the next RMSNorm's input) and ss[group] =
                    //   the sum of y^2 over this workgroup's rows: RMSNorm without a pass of its own
    uint ss_count;  // NORM: partial sums of squares to add up
    float inv_dim;  // NORM: 1 / elements of the normalised row
    float eps;      // NORM: RMSNorm's epsilon
} p;

layout(std430, binding = 0) readonly buffer Weights { uvec4 w[]; };  // blocks, row-major, UV uvec4 per block
layout(std430, binding = 1) readonly buffer Scales { uint d[]; };    // Q8_0 / Q4_0: fp16 scale per block, 2 a uint;
                                                                     // q4m / q5m / q6: MW words per block
layout(std430, binding = 2) readonly buffer Xin { vec4 x[]; };
layout(std430, binding = 3) readonly buffer Bias { float bias[]; };
layout(std430, binding = 4) buffer Yout { float y[]; };
layout(std430, binding = 5) readonly buffer Weights2 { uvec4 w2[]; };  // PAIR: the second matrix
layout(std430, binding = 6) readonly buffer Scales2 { uint d2[]; };
layout(std430, binding = 7) buffer SumSquares { float ss[]; };        // NORM reads, PRODUCE writes
layout(std430, binding = 8) readonly buffer NormWeight { float gnext[]; };  // PRODUCE: the next RMSNorm's weight
layout(std430, binding = 9) writeonly buffer NormInput { float xg[]; }; // PRODUCE: y * g

float block_scale(uint u, uint blk) {  // u = d[blk >> 1]
    return unpackHalf2x16((blk & 1u) != 0u ? u >> 16 : u).x;
}
