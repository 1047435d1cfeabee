// The body of every matrix product. Thread tid of the workgroup takes blocks tid, tid + WG, ... of its NW rows,
// keeps NW x NT partial sums, and the workgroup adds them up with subgroupAdd and shared memory across subgroups
// (no subgroup size assumed).
const uint NV = NW * NT;  // values reduced per thread
shared float red[NV * gl_WorkGroupSize.x];
shared float red_scratch[gl_WorkGroupSize.x];
#include "reduce.glsl"

#if !defined(MATMUL)
#include "quantize.glsl"
shared bool last_of_block;
shared float block_v[32];
shared int block_q[32];
shared uint block_max;  // the block's largest |x|'s bits
shared int block_sum;   // the sum of its integers

// QUANTIZE: the values this product finished (xg where it PRODUCEs, else y; one token, y_off a multiple of 32) go on
// to the next product rounded to 8 bits, without a pass of quantize_f32 between the two: the workgroup that finishes
// a 32-row block last (a count per block, set back to 0 by it) rounds the block, whose other rows other workgroups
// wrote (their writes made visible before they count; y and xg are coherent).
void quantize_block(uint g, uint tid) {
    uint blk = g * NR / 32u, first = blk * 32u;
    uint expected = (min(p.rows, first + 32u) - first + NR - 1u) / NR;  // workgroups with rows in the block
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) {
        last_of_block = atomicAdd(counts[blk], 1u) + 1u == expected;
        block_max = 0u;
        block_sum = 0;
    }
    barrier();
    if (!last_of_block) return;  // (uniform in the workgroup)
    memoryBarrierBuffer();
    bool produce = (p.flags & 8u) != 0u;
    // the block's largest |x| and its integers' sum are shared atomics, exact in any order (as in
    // attention_main.glsl's round_head: a NaN or a value over the limit shows in the largest)
    for (uint e = tid; e < 32u; e += gl_WorkGroupSize.x) {
        uint at = p.y_off + first + e;
        float v = first + e < p.rows ? (produce ? xg[at] : y[at]) : 0.0;
        block_v[e] = v;
        atomicMax(block_max, floatBitsToUint(v) & 0x7FFFFFFFu);
    }
    barrier();
    float m = uintBitsToFloat(block_max);
    vec2 scale = int8_block(m, !(m <= INT8_LIMIT));
    uint ob = p.y_off / 32u + blk;
    for (uint e = tid; e < 32u; e += gl_WorkGroupSize.x) {
        int q = int8_round(block_v[e], scale);
        block_q[e] = q;
        atomicAdd(block_sum, q);
        yr[ob * 32u + e] = float(q) * scale.x;
    }
    barrier();
    for (uint word = tid; word < 8u; word += gl_WorkGroupSize.x)
        yq[ob * 8u + word] = int8_pack(ivec4(block_q[4u * word], block_q[4u * word + 1u], block_q[4u * word + 2u],
                                             block_q[4u * word + 3u]));
    if (tid == 0u) {
        yd[ob] = vec2(scale.x, float(block_sum));
        counts[blk] = 0u;
    }
}
#endif

void main() {
    uint g = gl_WorkGroupID.z * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    if (g >= p.groups) return;  // the whole workgroup: before any barrier
    uint tid = gl_LocalInvocationID.x;
    uint row0 = g * NR, tok0 = gl_WorkGroupID.y * NT;
    float acc[NV];
    [[unroll]] for (uint i = 0; i < NV; i++) acc[i] = 0.0;
    uint xbase[NT];
    [[unroll]] for (uint t = 0; t < NT; t++) xbase[t] = (p.x_off + min(tok0 + t, p.n - 1) * p.x_stride) / 4;
    // The epilogue's reads of the bias, of y for the add and of the next norm's weight go out before the weights:
    // their latency then hides behind the main loop's instead of following it (measured: wo and w2 0.4-1 us faster
    // on an H100; the NORM sums of squares stay at the end, where hoisting them made gate/up 1.7 us slower).
    uint row = row0 + tid / NT, tok = tok0 + tid % NT;  // the value this thread finishes (tid < NR * NT)
    bool finishes = tid < NR * NT && row < p.rows && tok < p.n;  // gl_WorkGroupSize.x >= NR * NT
    uint at = p.y_off + tok * p.y_stride + row;
    float y_old = 0.0, b_row = 0.0, g_row = 0.0;
    if (finishes) {
        if ((p.flags & 1u) != 0u) y_old = y[at];
        if ((p.flags & 2u) != 0u) b_row = bias[p.bias_off + row];
        if ((p.flags & 8u) != 0u) g_row = gnext[row];
    }

    // Each thread loads UB blocks of every row before using any (more loads in flight); a block past the end of
    // the row is read at the last block and counted with weight 0.
    // QUANT 1: an fp16 scale per block in d (two a uint); QUANT 2: the type's words in d (a block's scale, min,
    // high bits: META), read by its meta_scale / meta_min / make_raw; with HAS_MIN a block adds min * (sum of its x).
    for (uint b0 = tid; b0 < p.nb; b0 += UB * gl_WorkGroupSize.x) {
        Raw raw[UB * NW];
        float sc[UB * NW];
        float mn[UB * NW];
        uint bs[UB];
        [[unroll]] for (uint u = 0; u < UB; u++) {
            uint b = b0 + u * gl_WorkGroupSize.x;
            float live = b < p.nb ? 1.0 : 0.0;
            bs[u] = min(b, p.nb - 1);
            [[unroll]] for (uint r = 0; r < NW; r++) {
                uint blk = min(row0 + r % NR, p.rows - 1) * p.nb + bs[u];  // rows past the end repeat the last
                uvec4 q[UV];
                uvec4 meta = uvec4(0u);
                float s = 1.0;
                if (r < NR) {
                    [[unroll]] for (uint i = 0; i < UV; i++) q[i] = w[UV * blk + i];
#ifdef META
                    meta = META(d, blk);
#else
                    if (QUANT != 0) s = block_scale(d[blk >> 1], blk);
#endif
                } else {
                    [[unroll]] for (uint i = 0; i < UV; i++) q[i] = w2[UV * blk + i];
#ifdef META
                    meta = META(d2, blk);
#else
                    if (QUANT != 0) s = block_scale(d2[blk >> 1], blk);
#endif
                }
#ifdef META
                s = meta_scale(meta);
                mn[u * NW + r] = live * meta_min(meta);
#endif
                sc[u * NW + r] = live * s;
                raw[u * NW + r] = make_raw(q, meta);
            }
        }
#ifdef INT8  // matvec_*_i8: a token's block is two uvec4 of xq and one vec2 of xd
        [[unroll]] for (uint u = 0; u < UB; u++) {
            [[unroll]] for (uint t = 0; t < NT; t++) {
                uint xb = xbase[t] / 8 + bs[u];
                uvec4 x0 = xq[2 * xb], x1 = xq[2 * xb + 1];
                vec2 s = xd[xb];  // the block's scale and the sum of its integers
                [[unroll]] for (uint r = 0; r < NW; r++) {
#ifdef HALF_SCALES  // Q6_K, Q3_K: each half's integer sum times its scale
                    acc[r * NT + t] += sc[u * NW + r] * s.x * dots_scaled(raw[u * NW + r], x0, x1);
#else
                    acc[r * NT + t] += sc[u * NW + r] * s.x * float(idot(raw[u * NW + r], x0, x1) - OFFSET * int(s.y));
#endif
#ifdef HAS_MIN
                    acc[r * NT + t] += mn[u * NW + r] * (s.x * s.y);
#endif
                }
            }
        }
#else
        [[unroll]] for (uint u = 0; u < UB; u++) {
            float part[NV];
            [[unroll]] for (uint i = 0; i < NV; i++) part[i] = 0.0;
#ifdef HAS_MIN
            float xsum[NT];
            [[unroll]] for (uint t = 0; t < NT; t++) xsum[t] = 0.0;
#endif
            [[unroll]] for (uint j = 0; j < 8; j++) {
                vec4 wv[NW];
                [[unroll]] for (uint r = 0; r < NW; r++) wv[r] = deq(raw[u * NW + r], j);
                [[unroll]] for (uint t = 0; t < NT; t++) {
                    vec4 xv = x[xbase[t] + bs[u] * 8 + j];
#ifdef HAS_MIN
                    xsum[t] += dot(xv, vec4(1.0));
#endif
                    [[unroll]] for (uint r = 0; r < NW; r++) part[r * NT + t] += dot(wv[r], xv);
                }
            }
            [[unroll]] for (uint i = 0; i < NV; i++) {
                acc[i] += sc[u * NW + i / NT] * part[i];
#ifdef HAS_MIN
                acc[i] += mn[u * NW + i / NT] * xsum[i % NT];
#endif
            }
        }
#endif
    }

    uint nsg = gl_NumSubgroups;
    [[unroll]] for (uint v = 0; v < NV; v++) {
        float s = subgroupAdd(acc[v]);
        if (subgroupElect()) red[v * gl_WorkGroupSize.x + gl_SubgroupID] = s;
    }
    barrier();
    float scale = 1.0;
    if ((p.flags & 4u) != 0u) {  // NORM (uniform: a push constant)
        float part = 0.0;
        for (uint i = tid; i < p.ss_count; i += gl_WorkGroupSize.x) part += ss[i];
        scale = inversesqrt(wg_sum(part) * p.inv_dim + p.eps);
    }
    float sq = 0.0;
    if (finishes) {
        uint v = tid;
        float sum = 0.0;
        for (uint i = 0; i < nsg; i++) sum += red[v * gl_WorkGroupSize.x + i];
        sum *= scale;
        if (PAIR != 0) {  // rows of W2 follow those of W: value v + NR * NT
            float up = 0.0;
            for (uint i = 0; i < nsg; i++) up += red[(v + NR * NT) * gl_WorkGroupSize.x + i];
            sum = sum / (1.0 + exp(-sum)) * (up * scale);
        }
        float value = sum + b_row + y_old;  // b_row, y_old: 0 unless BIAS, ACCUM
        y[at] = value;
        if ((p.flags & 8u) != 0u) {
            xg[at] = value * g_row;
            sq = value * value;
        }
    }
    if ((p.flags & 8u) != 0u) {  // PRODUCE: this workgroup's share of the next RMSNorm's sum of squares
        float total = wg_sum(sq);
        if (tid == 0u) ss[g] = total;
    }
#if !defined(MATMUL)
    if ((p.flags & 16u) != 0u) quantize_block(g, tid);
#endif
}
