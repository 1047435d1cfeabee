// The body of embed_<w>.comp and prenorm_f32.comp: a decode step's input (spmd/backends/vulkan_model.py), a
// workgroup a row. embed_<w> (a chained greedy decode, `ahead`): row r of x = row chain[r] of the device's copy of
// token_embd in the products' block layout (the type's .glsl: make_raw, deq;
// QUANT 0: float blocks, 1: an fp16 scale a block, 2: words of scale, min and high bits), dequantised as
// spmd.quants does on the host, to the same floats: q * scale rounds once; where a min follows, that product is
// exact in float32 (a scale of at most 17 bits times a q of at most 5), so q * scale + min rounds once however it
// is computed (fused or not).
// prenorm_f32 (FROM_X): x as the host wrote it. Where the decode is one row whose RMSNorms are fused into the
// products (ss_count > 0), both write xg = x * g (the first layer's RMSNorm input) and the sum of x^2 into ss[0]
// (ss[1..ss_count) zero), summed in the same order: a token chained on the device and one embedded by the host give
// the same bits.
layout(push_constant) uniform Push {
    uint nb;        // 32-element blocks of a row
    uint dim;       // elements of a row (the rest of x's padded row stays zero)
    uint ss_count;  // partial sums of squares the first products add up (0: no xg, no ss: several rows)
    uint x_stride;  // floats between rows of x
} p;
layout(std430, binding = 0) readonly buffer Weights { uvec4 w[]; };
layout(std430, binding = 1) readonly buffer Scales { uint d[]; };
layout(std430, binding = 2) readonly buffer Chain { uint chain[]; };  // [r]: row r's token (argmax_f32 writes it)
layout(std430, binding = 3) buffer X { float x[]; };
layout(std430, binding = 4) readonly buffer G { float g[]; };
layout(std430, binding = 5) writeonly buffer Xg { float xg[]; };
layout(std430, binding = 6) writeonly buffer SumSquares { float ss[]; };
#include "block_scale.glsl"
shared float red_scratch[gl_WorkGroupSize.x];
#include "reduce.glsl"

void main() {
    uint tid = gl_LocalInvocationID.x, r = gl_WorkGroupID.x;
    bool fused = p.ss_count != 0u;  // (uniform)
#ifndef FROM_X
    uint row = chain[r];
#endif
    float sq = 0.0;
    for (uint b = tid; b < p.nb; b += gl_WorkGroupSize.x) {
#ifndef FROM_X
        uint blk = row * p.nb + b;
        uvec4 q[UV];
        [[unroll]] for (uint i = 0; i < UV; i++) q[i] = w[UV * blk + i];
        uvec4 meta = uvec4(0u);
#ifdef META  // QUANT 2: the block's words (scale, min, high bits)
        meta = META(d, blk);
        float s = meta_scale(meta);
#else
        float s = QUANT != 0 ? block_scale(d[blk >> 1], blk) : 1.0;
#endif
        Raw raw = make_raw(q, meta);
#endif
        [[unroll]] for (uint j = 0; j < 8; j++) {
            [[unroll]] for (uint e = 0; e < 4; e++) {
                uint k = 32u * b + 4u * j + e;
                if (k < p.dim) {
#ifdef FROM_X
                    float v = x[r * p.x_stride + k];
#else
                    float v = deq(raw, j)[e] * s;
#ifdef HAS_MIN
                    v += meta_min(meta);
#endif
                    x[r * p.x_stride + k] = v;
#endif
                    if (fused) {
                        xg[k] = v * g[k];
                        sq += v * v;
                    }
                }
            }
        }
    }
    if (!fused) return;
    float total = wg_sum(sq);
    for (uint i = tid; i < p.ss_count; i += gl_WorkGroupSize.x) ss[i] = i == 0u ? total : 0.0;
}
