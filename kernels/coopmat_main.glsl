// The body of the prompt's matrix products on the matrix units (coopmat_<w>_f32.comp; GL_NV_cooperative_matrix,
// used only where the device offers fp16 16x8x16 products with float32 sums in a subgroup of 32: spmd/backends/
// vk_runtime.py checks). y[tok, row] (+)= sum_k W[row, k] * x[tok, k] for BR = 64 weight rows x BT tokens (16, 32
// or 64) a workgroup of 128 threads (4 subgroups; 256 and 8 with KSPLIT 2, below); BT and TG below are specialised
// (spmd/backends/vulkan.py's `coop_tile`).
//
// Each step stages SB blocks (one, or two where the type's .comp sets STEP_BLOCKS 2: Q4_0, Q8_0) of every row of the
// tile (dequantised by the type's deq, in float32) and those columns of every token in shared memory as fp16 pairs:
// v = hi + lo / 2^11, hi = fp16(v), lo = fp16((v - hi) 2^11) (scaled: a GPU may flush fp16 subnormals, and lo then
// is normal unless |v - hi| is under 2^-25, an absolute error it may drop; kernels/README). The products sum
// hi*hi in one float32 fragment and lo*hi + hi*lo in another, added at the end with the 2^-11: only lo*lo, about
// 2^-22 of the value, is left out, so a product is as close to the float32 one as float32 summation in another
// order, and greedy tokens do not move. The next step's weight blocks and x are loaded into registers
// while this step's products run.
// INTW (the quantised types but Q2_K: a weight is s * q (+ m), q an integer of at most 8 bits): q itself is staged,
// exact in fp16, and each row's scale (Q6_K, Q3_K: one a 16-element half) and min once, in rs, read as fragments
// with a stride of 0 (every token's row alike). A block's products q.x_lo / 2^11 + q.x_hi (4 products, not 6, and W
// is not split) are scaled as they are added to the sums; a min multiplies x's sum over the block (products with a
// matrix of ones, once a subgroup). Only x's lo*lo is dropped. F16 and BF16 weights are split as above.
// The subgroups split the tile in TSG groups of tokens x RSG groups of rows; each holds TG fragments of 16 tokens
// against RF of 8 rows, and every fragment it loads from shared memory serves several products. TG = 2 (with
// BT = 64) loads fewer fragments a product than TG = 1 but takes more registers: faster where the workgroups are
// few or PAIR's second matrix shares the x fragments, slower where many share an SM (vulkan.py measured it). Shared
// memory at most 48128 bytes (F16 pairs at BT = 64, TG = 1), within the 48 KiB every device offers.
// The results go through shared memory (with two blocks a step, x's: result_at) to an epilogue of all threads, a
// group of rows at a time: bias, residual add, stores a row of tokens at a time. PAIR (gate and up) keeps both
// matrices' fragments and multiplies them element by element (two fragments of one type lay out their elements
// alike).
// INT8 (coopmat_<w>_i8, --activations int8; Q4_0, Q8_0, Q4_1/Q4_K): x is kernels/quantize_f32's 8-bit integers
// and block scales, and a block's products are 8-bit (16x8x32, int32 sums, exact): staged as they are (the weights'
// nibbles masked, their offset taken off through x's sum of integers as matvec_*_i8 does), then scaled by the row's
// and the token's scales as the float32 sums add them up (matvec_*_i8's arithmetic: each block's exact integer
// sum, times the two scales, plus the min times the token's scale and sum).
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require

// KSPLIT (the type's .comp: 2) doubles the subgroups: each group of 4 takes its share of a step's blocks (SB / KSPLIT)
// for the same tile, and the groups' sums are added at the end, so that an SM has twice the subgroups to hide the
// latency of the loads and products where a product has about one workgroup an SM (Llama-2-7B's at 128 tokens)
#ifndef KSPLIT
#define KSPLIT 1
#endif
#if KSPLIT != 1 && (KSPLIT != 2 || defined(HALF_SCALES) && defined(INT8))
// (INT8 with HALF_SCALES: a workgroup of 256 would have two threads stage each block, which its put does not share)
#error KSPLIT: 1, or 2
#endif
const uint WG = 128 * KSPLIT;
layout(local_size_x = WG) in;
const uint BR = NR;           // 64 weight rows
layout(constant_id = 3) const uint BT = 32;  // tokens (16, 32 or 64)
layout(constant_id = 4) const uint TG = 1;   // fragments of 16 tokens a subgroup holds (2 only with BT 32 or 64)
const uint TSG = BT / (16 * TG);  // subgroups along the tokens (1, 2 or 4)
const uint RSG = 4 / TSG;     // ... along the rows (4, 2 or 1)
const uint SR = BR / RSG;     // rows a subgroup holds
const uint RF = SR / 8;       // its row fragments of 8
const uint CS = SR + 4;       // floats between token rows of the result tile (a subgroup's rows at a time)
const float LO = 2048.0;
#define FRAG fcoopmatNV<32, gl_ScopeSubgroup, 16, 8>
#define AMAT fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>
#define BMAT fcoopmatNV<16, gl_ScopeSubgroup, 16, 8>
#ifdef INT8
#extension GL_NV_integer_cooperative_matrix : require
#extension GL_EXT_shader_explicit_arithmetic_types_int8 : require
#define IMAT_A icoopmatNV<8, gl_ScopeSubgroup, 16, 32>
#define IMAT_B icoopmatNV<8, gl_ScopeSubgroup, 32, 8>
#define IFRAG icoopmatNV<32, gl_ScopeSubgroup, 16, 8>
#endif

#ifdef INT8
// 8-bit tiles as uvec4 (16 of them; the fragments are loaded with element offsets and strides in those units): SB
// blocks a step (a barrier for 4 blocks, not one; 2 for a pair whose subgroups hold 16 tokens, TG 1: at 64 tokens 4
// would pass 48 KiB; at 16 or 32 they would fit, not measured), KB uvec4 a row
// (SB blocks of 32 bytes and 16 bytes of padding: fewer bank conflicts)
// HALF_SCALES (Q6_K, Q3_K): a weight block is staged as its first half, 32 zero bytes and its second half (KW uvec4
// a row), so that the 32 bytes from either half's start make that half alone: two products a block, one a half
#ifdef HALF_SCALES
const uint SB = 2, WB = 4;
#else
const uint SB = PAIR == 1 && TG == 1 ? 2 : 4, WB = 2;  // WB: uvec4 a staged weight block
#endif
const uint KB = 2 * SB + 1, KW = WB * SB + 1;
shared uvec4 xs8[BT * KB];                     // x: token-major
shared uvec4 ws8[BR * KW];                     // W: read as W^T
shared uvec4 vs8[PAIR == 1 ? BR * KW : 1];     // PAIR's second matrix
shared float xsc[SB * BT], xsu[SB * BT];       // block s of token t at s * BT + t: its scale and sum of integers
// block s's scale of row r of matrix m at (2s + m) * BR + r, and (HAS_MIN) its min (HALF_SCALES: its second half's
// scale) at MINS + the same; read as fragments of 16 tokens x 8 rows with a stride of 0 (every token's row alike)
const uint MINS = 2 * SB * BR;
shared float rs[2 * MINS];
#else
// Blocks a step: 2 where the type's .comp says so (coopmat_q4_0_f32, coopmat_q8_0_f32: a barrier for two blocks, one
// for each group of subgroups with KSPLIT 2, and x's tile then holds the results; kernels/README), else 1. F16 and
// BF16 pairs would pass 48 KiB with 2.
#ifndef STEP_BLOCKS
#define STEP_BLOCKS 1
#endif
#if STEP_BLOCKS != 1 && (STEP_BLOCKS != 2 || !defined(INTW))
#error STEP_BLOCKS: 1, or 2 with INTW
#endif
#if KSPLIT != 1 && (KSPLIT != STEP_BLOCKS || !defined(INTW))
#error KSPLIT: 1, or 2 with INTW and STEP_BLOCKS 2
#endif
const uint SB = STEP_BLOCKS;
// The staged tiles as fp16 in groups of 4 (uvec2, each group stored at once; the fragments are loaded with element
// offsets and strides in those units: K4 groups a row of SB blocks and 8 halves of padding: fewer bank conflicts,
// 16-byte rows)
const uint K4 = 8 * SB + 2;
// x: token-major, the fp16 highs, then from XLO the lows (STEP_BLOCKS 2: the result tile afterwards, result_at)
shared uvec2 xs[2 * BT * K4];
const uint XLO = BT * K4;
#ifdef INTW
#ifndef HALF_SCALES
#define deq_int deq   // the type's deq gives the integers; its scale (and min) come apart
#endif
// W (and PAIR's W2): integers q, read as W^T. (vs_hi sized by PAIR, `PAIR == 1 ? BR * K4 : 1` or with a product
// and a sum, gave wrong products on an H200, though it was never read without PAIR: sizes stay constant here)
shared uvec2 ws_hi[BR * K4], vs_hi[BR * K4];
#ifdef HALF_SCALES
const uint NV = 2;                             // Q6_K, Q3_K: a scale for each 16-element half
#elif defined(HAS_MIN)
const uint NV = 2;                             // a scale and a min
#else
const uint NV = 1;
#endif
// Value v of row r of matrix m (0: W, 1: W2) in the step's block s (v 0: its scale, or its first half's; 1: its
// second half's scale (HALF_SCALES) or its min (HAS_MIN)) at ((s * (PAIR + 1) + m) * NV + v) * BR + r: read as
// fragments of 16 tokens x 8 rows with a stride of 0 (every token's row alike)
shared float rs[SB * (PAIR + 1) * NV * BR];
uint rs_at(uint s, uint m, uint v, uint r) { return ((s * (PAIR + 1) + m) * NV + v) * BR + r; }
#else
shared uvec2 ws_hi[BR * K4], ws_lo[BR * K4];   // W: row-major, read as W^T (column-major)
shared uvec2 vs_hi[BR * K4], vs_lo[BR * K4];   // PAIR: the second matrix
#endif
#endif
#if !defined(INT8) && STEP_BLOCKS == 2
// The result tile (BT * CS floats) takes x's place in KSPLIT's adding and the epilogue, which follow the last step's
// barrier: 2 * K4 floats a token, at least CS (72 against 68 at most), leave room for two blocks a step within 48 KiB
void put_result(FRAG v, uint at) { coopMatStoreNV(v, xs, at / 2, CS / 2, false); }
FRAG get_result(uint at) { FRAG v; coopMatLoadNV(v, xs, at / 2, CS / 2, false); return v; }
float result_at(uint at) { return uintBitsToFloat(xs[at / 2][at % 2]); }
#else
shared float cs[BT * CS];
void put_result(FRAG v, uint at) { coopMatStoreNV(v, cs, at, CS, false); }
FRAG get_result(uint at) { FRAG v; coopMatLoadNV(v, cs, at, CS, false); return v; }
float result_at(uint at) { return cs[at]; }
#endif

#ifndef INT8
void split4(vec4 v, uint at, uint dest) {  // v -> group `at` of tile dest (0: x, 1: W, 2: W2)
    // hi: v with its float32 mantissa rounded to fp16's 10 bits in integer arithmetic, so that v - hi is exactly
    // what fp16 drops (with conversions there, and lo unscaled, an H200 gave errors of fp16 size: kernels/README)
    vec4 h = uintBitsToFloat((floatBitsToUint(v) + 0x1000u) & 0xFFFFE000u);
    vec4 l = (v - h) * LO;
    uvec2 hi = uvec2(packHalf2x16(h.xy), packHalf2x16(h.zw)), lo = uvec2(packHalf2x16(l.xy), packHalf2x16(l.zw));
    if (dest == 0) {
        xs[at] = hi; xs[XLO + at] = lo;
#ifndef INTW
    } else if (dest == 1) {
        ws_hi[at] = hi; ws_lo[at] = lo;
    } else {
        vs_hi[at] = hi; vs_lo[at] = lo;
#endif
    }
}
#endif

// What a thread stages a step (blocks b .. b + SB - 1), loaded a step ahead: the step's NBLK blocks of the tile's
// rows (W's, then PAIR's W2's, block by block) shared out TPB threads a block (the float32 path's small steps: each
// dequantises JN of a block's 8 groups of 4 elements) or BPT blocks a thread (the INT8 path: always), and its share
// of x. Blocks past the row's end are read at its last and staged with scale and min 0.
const uint WROWS = BR * (PAIR + 1), NBLK = WROWS * SB;
const uint TPB = NBLK >= WG ? 1 : WG / NBLK, BPT = NBLK >= WG ? NBLK / WG : 1;
uvec4 pq[BPT * UV];
uvec4 pmeta[BPT];
float ps[BPT];

uint block_of(uint k) { return gl_LocalInvocationID.x / TPB + k * (WG / TPB); }  // the thread's k-th block: u + s WROWS

void fetch_weights(uint row0, uint b) {
    [[unroll]] for (uint k = 0; k < BPT; k++) {
        uint i = block_of(k), u = i % WROWS, s = i / WROWS;  // row u % BR of W (u < BR) or W2, block b + s
        bool second = u >= BR;
        // rows past the end repeat the last (not stored)
        uint blk = min(row0 + u % BR, p.rows - 1) * p.nb + min(b + s, p.nb - 1);
        [[unroll]] for (uint j = 0; j < UV; j++) pq[k * UV + j] = second ? w2[UV * blk + j] : w[UV * blk + j];
        pmeta[k] = uvec4(0u);
        ps[k] = b + s < p.nb ? 1.0 : 0.0;
#ifdef META
        pmeta[k] = second ? META(d2, blk) : META(d, blk);
#else
        if (QUANT != 0) ps[k] *= block_scale(second ? d2[blk >> 1] : d[blk >> 1], blk);
#endif
    }
}

#ifdef INT8
// x: XI halves of a token's block and DI of its (scale, sum of integers)
const uint XI = (2 * SB * BT + WG - 1) / WG, DI = (SB * BT + WG - 1) / WG;
uvec4 px8[XI];
vec2 pxd[DI];

void fetch(uint row0, uint tok0, uint b) {
    uint tid = gl_LocalInvocationID.x;
    fetch_weights(row0, b);
    // x_stride: elements; a block of x is two uvec4 in xq and a vec2 in xd
    [[unroll]] for (uint k = 0; k < XI; k++) {
        uint i = tid + k * WG, t = min(tok0 + i / (2 * SB), p.n - 1), c = i % (2 * SB);
        if (i < 2 * SB * BT) px8[k] = xq[2 * (t * p.x_stride / 32 + min(b + c / 2, p.nb - 1)) + c % 2];
    }
    [[unroll]] for (uint k = 0; k < DI; k++) {
        uint i = tid + k * WG, t = min(tok0 + i / SB, p.n - 1);
        if (i < SB * BT) pxd[k] = xd[t * p.x_stride / 32 + min(b + i % SB, p.nb - 1)];
    }
}

void put() {
    uint tid = gl_LocalInvocationID.x;
    [[unroll]] for (uint k = 0; k < BPT; k++) {
        uint i = block_of(k), u = i % WROWS, s = i / WROWS, r = u % BR, m = u / BR;
        uvec4 q[UV];
        [[unroll]] for (uint j = 0; j < UV; j++) q[j] = pq[k * UV + j];
        Raw raw = make_raw(q, pmeta[k]);
        [[unroll]] for (uint h = 0; h < WB; h++) {  // 8-bit integers, 16 a half block (HALF_SCALES: zeros between)
            uvec4 q = h == 0 ? int8_half(raw, 0u) : h == WB - 1 ? int8_half(raw, 1u) : uvec4(0u);
            if (m == 0) ws8[r * KW + WB * s + h] = q;
            else vs8[r * KW + WB * s + h] = q;
        }
#ifdef HALF_SCALES
        rs[(2 * s + m) * BR + r] = ps[k] * half_scale(raw, 0u);
        rs[MINS + (2 * s + m) * BR + r] = ps[k] * half_scale(raw, 1u);
#elif defined(META)
        rs[(2 * s + m) * BR + r] = ps[k] * meta_scale(pmeta[k]);
#else
        rs[(2 * s + m) * BR + r] = ps[k];
#endif
#ifdef HAS_MIN
        rs[MINS + (2 * s + m) * BR + r] = ps[k] * meta_min(pmeta[k]);
#endif
    }
    [[unroll]] for (uint k = 0; k < XI; k++) {
        uint i = tid + k * WG;
        if (i < 2 * SB * BT) xs8[(i / (2 * SB)) * KB + i % (2 * SB)] = px8[k];
    }
    [[unroll]] for (uint k = 0; k < DI; k++) {
        uint i = tid + k * WG;
        if (i < SB * BT) {
            xsc[(i % SB) * BT + i / SB] = pxd[k].x;
            xsu[(i % SB) * BT + i / SB] = pxd[k].y;
        }
    }
}
#else
const uint JN = 8 / TPB;
const uint XV = BT * 8 * SB / WG;  // x: vec4 a thread
vec4 px[XV];

void fetch(uint row0, uint tok0, uint b) {
    uint tid = gl_LocalInvocationID.x;
    fetch_weights(row0, b);
    [[unroll]] for (uint i = 0; i < XV; i++) {
        uint v = tid + i * WG, t = v / (8 * SB), c = v % (8 * SB);  // vec4 c of the step's blocks of token t
        uint col = min(b + c / 8, p.nb - 1) * 8 + c % 8;
        px[i] = x[(p.x_off + min(tok0 + t, p.n - 1) * p.x_stride) / 4 + col];
    }
}

void put() {
    uint tid = gl_LocalInvocationID.x, j0 = (tid % TPB) * JN;
    [[unroll]] for (uint k = 0; k < BPT; k++) {
        uint i = block_of(k), u = i % WROWS, s = i / WROWS, r = u % BR, m = u / BR;
        float sc = ps[k], mn = 0.0;
#ifdef META
        sc *= meta_scale(pmeta[k]);
        mn = ps[k] * meta_min(pmeta[k]);
#endif
        uvec4 q[UV];
        [[unroll]] for (uint j = 0; j < UV; j++) q[j] = pq[k * UV + j];
        Raw raw = make_raw(q, pmeta[k]);
        uint at = r * K4 + s * 8;
#ifdef INTW
        [[unroll]] for (uint j = j0; j < j0 + JN; j++) {  // integers: exact in fp16
            vec4 v = deq_int(raw, j);
            uvec2 h = uvec2(packHalf2x16(v.xy), packHalf2x16(v.zw));
            if (m == 0) ws_hi[at + j] = h; else vs_hi[at + j] = h;
        }
        if (tid % TPB == 0) {
#ifdef HALF_SCALES
            rs[rs_at(s, m, 0, r)] = ps[k] * half_scale(raw, 0u);
            rs[rs_at(s, m, 1, r)] = ps[k] * half_scale(raw, 1u);
#else
            rs[rs_at(s, m, 0, r)] = sc;
#endif
#ifdef HAS_MIN
            rs[rs_at(s, m, 1, r)] = mn;
#endif
        }
#else
        [[unroll]] for (uint j = j0; j < j0 + JN; j++) split4(deq(raw, j) * sc + mn, at + j, 1 + m);
#endif
    }
    [[unroll]] for (uint i = 0; i < XV; i++) {
        uint v = tid + i * WG;
        split4(px[i], (v / (8 * SB)) * K4 + v % (8 * SB), 0);
    }
}
#endif

#ifdef INTW
struct XBlock { AMAT h0, h1, l0, l1; };  // a block of 16 tokens' x: its two 16-column halves, hi and lo

FRAG row_values(uint at) {  // one value a weight row (rs), alike for every token
    FRAG v;
    coopMatLoadNV(v, rs, at, 0, false);
    return v;
}

// What a block of 8 rows (integers q0 and q1: its 16-column halves) adds to 16 tokens' sums: the products
// q.x_lo / 2^11 + q.x_hi, scaled by the row's scale s0 (s0 and s1: of each half, HALF_SCALES), plus its min times
// x's sum (HAS_MIN)
FRAG block_sum(XBlock a, FRAG xsum, BMAT q0, BMAT q1, FRAG s0, FRAG s1, FRAG mins) {
    FRAG v;
#ifdef HALF_SCALES
    FRAG p0 = coopMatMulAddNV(a.h0, q0, coopMatMulAddNV(a.l0, q0, FRAG(0.0)) * (1.0 / LO));
    FRAG p1 = coopMatMulAddNV(a.h1, q1, coopMatMulAddNV(a.l1, q1, FRAG(0.0)) * (1.0 / LO));
    for (int i = 0; i < v.length(); i++) v[i] = p0[i] * s0[i] + p1[i] * s1[i];
#else
    FRAG part = coopMatMulAddNV(a.l1, q1, coopMatMulAddNV(a.l0, q0, FRAG(0.0))) * (1.0 / LO);
    part = coopMatMulAddNV(a.h1, q1, coopMatMulAddNV(a.h0, q0, part));
    for (int i = 0; i < v.length(); i++) v[i] = part[i] * s0[i];
#endif
#ifdef HAS_MIN
    for (int i = 0; i < v.length(); i++) v[i] += xsum[i] * mins[i];
#endif
    return v;
}
#endif

void main() {
    uint g = gl_WorkGroupID.z * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    if (g >= p.groups) return;  // the whole workgroup: before any barrier
    // sg: the subgroup within its group of 4, kg: its group (KSPLIT)
    uint tid = gl_LocalInvocationID.x, sg = gl_SubgroupID % 4, kg = gl_SubgroupID / 4, rg = sg / TSG;
    uint row0 = g * BR, tok0 = gl_WorkGroupID.y * BT;
    uint tk = (sg % TSG) * TG * 16;  // this subgroup's first token in the tile (its first row: rg * SR)
#ifndef INT8
    uint a_at = tk * K4, b_at = rg * SR * K4;
#endif
    // sums: token fragment t against row fragment f at t * RF + f (PAIR: W2's in acc2)
    FRAG acc[TG * RF], acc2[TG * RF];
#ifndef INTW
    FRAG low[TG * RF], low2[TG * RF];
#endif
    [[unroll]] for (uint i = 0; i < TG * RF; i++) {
        acc[i] = FRAG(0.0);
        acc2[i] = FRAG(0.0);
#ifndef INTW
        low[i] = FRAG(0.0);
        low2[i] = FRAG(0.0);
#endif
    }
    fetch(row0, tok0, 0);
    for (uint b = 0; b < p.nb; b += SB) {
        put();
        barrier();
        if (b + SB < p.nb) fetch(row0, tok0, b + SB);
#ifdef INT8
        [[unroll]] for (uint s = 0; s < SB / KSPLIT; s++) {  // the step's blocks (this group's share)
            uint sb = kg * (SB / KSPLIT) + s;
            IMAT_A a[TG];
            FRAG xs[TG], xo[TG], xm[TG];  // each token's scale, OFFSET times its sum, scale times sum (HAS_MIN)
            [[unroll]] for (uint t = 0; t < TG; t++) {
                uint at = tk + t * 16;
                coopMatLoadNV(a[t], xs8, at * KB + 2 * sb, KB, false);
                FRAG su;
                // (column-major with a stride of 0: alike for every row)
                coopMatLoadNV(xs[t], xsc, sb * BT + at, 0, true);
                coopMatLoadNV(su, xsu, sb * BT + at, 0, true);
                for (int i = 0; i < su.length(); i++) {
                    xo[t][i] = float(OFFSET) * su[i];
                    xm[t][i] = xs[t][i] * su[i];
                }
            }
            [[unroll]] for (uint f = 0; f < RF; f++) {
                uint r = rg * SR + f * 8;
                [[unroll]] for (uint m = 0; m <= PAIR; m++) {  // W, then W2
                    IMAT_B q, q2;  // (q2: HALF_SCALES, the second half)
                    if (m == 0) coopMatLoadNV(q, ws8, r * KW + WB * sb, KW, true);
                    else coopMatLoadNV(q, vs8, r * KW + WB * sb, KW, true);
#ifdef HALF_SCALES
                    if (m == 0) coopMatLoadNV(q2, ws8, r * KW + WB * sb + 2, KW, true);
                    else coopMatLoadNV(q2, vs8, r * KW + WB * sb + 2, KW, true);
#endif
                    FRAG s0 = row_values((2 * sb + m) * BR + r), mins = s0;
#if defined(HAS_MIN) || defined(HALF_SCALES)
                    mins = row_values(MINS + (2 * sb + m) * BR + r);  // (HALF_SCALES: the second half's scale)
#endif
                    [[unroll]] for (uint t = 0; t < TG; t++) {
                        FRAG v = FRAG(coopMatMulAddNV(a[t], q, IFRAG(0)));  // exact
#ifdef HALF_SCALES  // each half's sum times its scale, as matvec_q6_i8 adds them
                        FRAG v2 = FRAG(coopMatMulAddNV(a[t], q2, IFRAG(0)));
                        for (int i = 0; i < v.length(); i++) v[i] = xs[t][i] * (v[i] * s0[i] + v2[i] * mins[i]);
#else
                        for (int i = 0; i < v.length(); i++) {
                            v[i] = s0[i] * xs[t][i] * (v[i] - xo[t][i]);
#ifdef HAS_MIN
                            v[i] += mins[i] * xm[t][i];
#endif
                        }
#endif
                        if (m == 0) acc[t * RF + f] = acc[t * RF + f] + v;
                        else acc2[t * RF + f] = acc2[t * RF + f] + v;
                    }
                }
            }
        }
#elif defined(INTW)
        [[unroll]] for (uint s = 0; s < SB / KSPLIT; s++) {  // the step's blocks (this group's share)
            uint sb = kg * (SB / KSPLIT) + s;
            XBlock a[TG];
            FRAG xsum[TG];  // HAS_MIN: each token's sum of the block's x (products with ones), for the mins
            [[unroll]] for (uint t = 0; t < TG; t++) {
                uint at = a_at + t * 16 * K4 + sb * 8;
                coopMatLoadNV(a[t].h0, xs, at, K4, false);
                coopMatLoadNV(a[t].h1, xs, at + 4, K4, false);
                coopMatLoadNV(a[t].l0, xs, XLO + at, K4, false);
                coopMatLoadNV(a[t].l1, xs, XLO + at + 4, K4, false);
                xsum[t] = FRAG(0.0);
#ifdef HAS_MIN
                BMAT ones = BMAT(1.0);
                xsum[t] = coopMatMulAddNV(a[t].h1, ones, coopMatMulAddNV(a[t].h0, ones, coopMatMulAddNV(a[t].l1,
                    ones, coopMatMulAddNV(a[t].l0, ones, FRAG(0.0))) * (1.0 / LO)));
#endif
            }
            [[unroll]] for (uint f = 0; f < RF; f++) {
                uint w_at = b_at + f * 8 * K4 + sb * 8, r = rg * SR + f * 8;
                [[unroll]] for (uint m = 0; m <= PAIR; m++) {  // W, then W2
                    BMAT q0, q1;
                    if (m == 0) {
                        coopMatLoadNV(q0, ws_hi, w_at, K4, true);
                        coopMatLoadNV(q1, ws_hi, w_at + 4, K4, true);
                    } else {
                        coopMatLoadNV(q0, vs_hi, w_at, K4, true);
                        coopMatLoadNV(q1, vs_hi, w_at + 4, K4, true);
                    }
                    FRAG s0 = row_values(rs_at(sb, m, 0, r)), s1 = s0, mins = s0;
#ifdef HALF_SCALES
                    s1 = row_values(rs_at(sb, m, 1, r));
#endif
#ifdef HAS_MIN
                    mins = row_values(rs_at(sb, m, 1, r));
#endif
                    [[unroll]] for (uint t = 0; t < TG; t++) {
                        FRAG v = block_sum(a[t], xsum[t], q0, q1, s0, s1, mins);
                        if (m == 0) acc[t * RF + f] = acc[t * RF + f] + v;
                        else acc2[t * RF + f] = acc2[t * RF + f] + v;
                    }
                }
            }
        }
#else
        [[unroll]] for (uint k = 0; k < 8; k += 4) {  // 16 columns: 4 groups
            AMAT ah[TG], al[TG];
            [[unroll]] for (uint t = 0; t < TG; t++) {
                coopMatLoadNV(ah[t], xs, a_at + t * 16 * K4 + k, K4, false);
                coopMatLoadNV(al[t], xs, XLO + a_at + t * 16 * K4 + k, K4, false);
            }
            [[unroll]] for (uint f = 0; f < RF; f++) {
                BMAT bh, bl;
                coopMatLoadNV(bh, ws_hi, b_at + f * 8 * K4 + k, K4, true);
                coopMatLoadNV(bl, ws_lo, b_at + f * 8 * K4 + k, K4, true);
                [[unroll]] for (uint t = 0; t < TG; t++) {
                    uint i = t * RF + f;
                    acc[i] = coopMatMulAddNV(ah[t], bh, acc[i]);
                    low[i] = coopMatMulAddNV(al[t], bh, low[i]);
                    low[i] = coopMatMulAddNV(ah[t], bl, low[i]);
                }
                if (PAIR != 0) {
                    coopMatLoadNV(bh, vs_hi, b_at + f * 8 * K4 + k, K4, true);
                    coopMatLoadNV(bl, vs_lo, b_at + f * 8 * K4 + k, K4, true);
                    [[unroll]] for (uint t = 0; t < TG; t++) {
                        uint i = t * RF + f;
                        acc2[i] = coopMatMulAddNV(ah[t], bh, acc2[i]);
                        low2[i] = coopMatMulAddNV(al[t], bh, low2[i]);
                        low2[i] = coopMatMulAddNV(ah[t], bl, low2[i]);
                    }
                }
            }
        }
#endif
        barrier();
    }
#if KSPLIT == 2
    // the second group's sums to the first's, a group of rows at a time through the result tile (at the epilogue's
    // places: token fragment i / RF, row fragment i % RF)
    [[unroll]] for (uint m = 0; m <= PAIR; m++) {
        for (uint k = 0; k < RSG; k++) {
            if (rg == k && kg == 1) {
                [[unroll]] for (uint i = 0; i < TG * RF; i++) {
                    put_result(m == 0 ? acc[i] : acc2[i], (tk + (i / RF) * 16) * CS + (i % RF) * 8);
                }
            }
            barrier();
            if (rg == k && kg == 0) {
                [[unroll]] for (uint i = 0; i < TG * RF; i++) {
                    FRAG v = get_result((tk + (i / RF) * 16) * CS + (i % RF) * 8);
                    if (m == 0) acc[i] = acc[i] + v; else acc2[i] = acc2[i] + v;
                }
            }
            barrier();
        }
    }
#endif
    [[unroll]] for (uint i = 0; i < TG * RF; i++) {
#ifndef INTW
        acc[i] = acc[i] + low[i] * (1.0 / LO);
        if (PAIR != 0) acc2[i] = acc2[i] + low2[i] * (1.0 / LO);
#endif
        if (PAIR != 0) {
            for (int e = 0; e < acc[i].length(); e++) {
                float gate = acc[i][e];
                acc[i][e] = gate / (1.0 + exp(-gate)) * acc2[i][e];
            }
        }
    }
    for (uint k = 0; k < RSG; k++) {  // the epilogue, a group of rows (one subgroup's) at a time
        if (rg == k && kg == 0) {
            [[unroll]] for (uint t = 0; t < TG; t++) {
                [[unroll]] for (uint f = 0; f < RF; f++) {
                    put_result(acc[t * RF + f], (tk + t * 16) * CS + f * 8);
                }
            }
        }
        barrier();
        for (uint i = tid; i < BT * SR; i += WG) {
            uint t = i / SR, r = i % SR;
            uint row = row0 + k * SR + r, tok = tok0 + t;
            if (row < p.rows && tok < p.n) {
                uint at = p.y_off + tok * p.y_stride + row;
                float value = result_at(t * CS + r);
                if ((p.flags & 2u) != 0u) value += bias[p.bias_off + row];
                if ((p.flags & 1u) != 0u) value += y[at];
                y[at] = value;
            }
        }
        barrier();
    }
}
