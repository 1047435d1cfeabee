// The body of attention_f32.comp and attention_kv16.comp (KV_F16: the cache holds keys and values as float16).
// Attention of one query head for one token row, f32 arithmetic, with RoPE and the KV-cache store fused in.
// A pass stacks the rows of several segments (consecutive tokens of one sequence each, in its own cache slot).
// Workgroup (h, i): query head h of this rank, row i of the pass, at position pos of its sequence (rows[i]). It
// rotates its query, scores its sequence's keys 0..pos causally, and sums the values with a running (online)
// softmax in chunks of CH keys. Keys and values at positions < start (its segment's first position) come from its
// slot's cache; those of its segment in this pass (start..pos) straight from the qkv buffer (keys rotated on the
// fly), so the first query head of each KV head can store row i's rotated key and value at position pos in the
// same dispatch: no workgroup reads those cache entries here (one segment per slot in a pass).
// The row table is host-written before each submit, so a recorded command buffer serves every decode step.
// A pass of more than ATTENTION_STORE rows (spmd/backends/vulkan_model.py: a prompt, or a decode step of many
// sequences) runs it twice (p.mode): first every row's key and value into the cache, then the attention with all
// keys from the cache, where mode 0 would rotate each of its segment's keys again for every query head and row.
// (Mode 1 still starts every query head's workgroup and rotates its query: a cost not measured, left as it is.)
// A decode step over long caches (SPLIT_FROM) attends in splits of keys, a workgroup (h, i, split) each writing its
// partial softmax (mode 3; split 0 stores the row's key and value, which the split holding its position reads from
// qkv, as mode 0 does), then combines them (mode 4): with a workgroup per query head alone, most of a GPU idled
// while a few workgroups walked thousands of keys (flash-decoding's split). Its rows are one-token segments.
// With KV_F16 (--kv-cache f16) each key and value is rounded to float16 as it is stored, and the keys and values
// of this pass's own rows are rounded the same way where they are read from the qkv buffer: every key and value
// is then the float16 value the cache holds, as in the reference (spmd.model), whichever mode runs.
// With p.round (--activations int8, a one-token decode) modes 0 and 4 also round the head's output to 8 bits a
// block for wo (`round_head`), which saves wo's input a rounding pass of its own and the step it waits for.
#extension GL_EXT_control_flow_attributes : require
#include "attention_io.glsl"
#include "quantize.glsl"
layout(constant_id = 2) const uint KS = 1;   // key splits of the value sum: max(1, WG / (HD / 4))
layout(constant_id = 3) const uint E = 1;    // (4 dims, split) pairs per thread: ceil(HD / 4 * KS / WG)
layout(constant_id = 4) const uint VU = 8;   // values a thread loads before it sums them (loads in flight)
const uint CH = 256;                         // keys per chunk

shared float red_scratch[gl_WorkGroupSize.x];
#include "reduce.glsl"
shared float s[CH];
shared float qs[HD];
shared float kn[HD];
shared float vn[HD];        // this row's value (as the cache holds it), stored with its key at the end
shared vec4 comb[H4 * KS];
shared float res[HD];       // p.round: the head's output
shared int res_q[HD];       // and its integers
shared vec2 res_d[(HD + 31u) / 32u];  // per block (d, 1 / d): `int8_block`'s

void round_head(uint i, uint h) {
    // res, the head's output (h * HD.. of row i, HD a multiple of 32), rounded to 8 bits a 32-element block as
    // kernels/quantize_f32 rounds it: the same integers, scales and sums, bit for bit
    if (HD % 32u != 0u) return;  // (uniform: a specialisation constant; the host asks only for whole blocks)
    uint tid = gl_LocalInvocationID.x, WG = gl_WorkGroupSize.x, nb = p.o_stride / 32u;
    barrier();
    for (uint b = tid; b < HD / 32u; b += WG) {
        float m = 0.0;
        bool bad = false;
        for (uint e = 32u * b; e < 32u * b + 32u; e++) {
            float a = abs(res[e]);
            m = max(m, a);
            bad = bad || !(a <= INT8_LIMIT);  // (NaN too)
        }
        res_d[b] = int8_block(m, bad);
    }
    barrier();
    uint ob = i * nb + h * HD / 32u;  // the head's first block in the row
    for (uint e = tid; e < HD; e += WG) {
        vec2 scale = res_d[e / 32u];
        int q = int8_round(res[e], scale);
        res_q[e] = q;
        o_rounded[ob * 32u + e] = float(q) * scale.x;
    }
    barrier();
    for (uint w = tid; w < HD / 4u; w += WG)
        oq[ob * 8u + w] = int8_pack(ivec4(res_q[4u * w], res_q[4u * w + 1u], res_q[4u * w + 2u], res_q[4u * w + 3u]));
    for (uint b = tid; b < HD / 32u; b += WG) {
        int sum = 0;
        for (uint e = 32u * b; e < 32u * b + 32u; e++) sum += res_q[e];
        od[ob + b] = vec2(res_d[b].x, float(sum));
    }
}

void store_row(bool stores, uint c) {
    // the row's key and value (in kn, vn) into cache row c, where this workgroup is the one that stores them
    if (!stores) return;
    for (uint d4 = gl_LocalInvocationID.x; d4 < H4; d4 += gl_WorkGroupSize.x) {
        kc[c * H4 + d4] = narrow(vec4(kn[4 * d4], kn[4 * d4 + 1], kn[4 * d4 + 2], kn[4 * d4 + 3]));
        vc[c * H4 + d4] = narrow(vec4(vn[4 * d4], vn[4 * d4 + 1], vn[4 * d4 + 2], vn[4 * d4 + 3]));
    }
}

void combine(uint h, uint i, uint T) {
    // mode 4: the live splits' partial softmaxes of (head h, row i) rescaled to their largest m and added up
    uint WG = gl_WorkGroupSize.x, at0 = (i * gl_NumWorkGroups.x + h) * p.splits;
    uint live = (T + p.split_keys - 1u) / p.split_keys;
    float mx = -1e30, total = 0.0;
    for (uint k = 0; k < live; k++) mx = max(mx, part[(at0 + k) * (HD + 2u)]);
    for (uint k = 0; k < live; k++) total += part[(at0 + k) * (HD + 2u) + 1u] * exp(part[(at0 + k) * (HD + 2u)] - mx);
    for (uint d = gl_LocalInvocationID.x; d < HD; d += WG) {
        float sum = 0.0;
        for (uint k = 0; k < live; k++) {
            uint at = (at0 + k) * (HD + 2u);
            sum += part[at + 2u + d] * exp(part[at] - mx);
        }
        o[i * p.o_stride + h * HD + d] = res[d] = sum / total;
    }
    if (p.round != 0u) round_head(i, h);
}

void main() {
    uint WG = gl_WorkGroupSize.x;
    uint h = gl_WorkGroupID.x, i = gl_WorkGroupID.y, tid = gl_LocalInvocationID.x;
    uint kvh = h / p.group;
    uvec4 row = rows[i];
    uint pos = row.x, start = p.mode == 2u ? row.x + 1u : row.y, first = row.z, T = pos + 1u;
    if (p.mode == 4u) {
        combine(h, i, T);
        return;
    }
    uint lo = 0u, hi = T;  // the keys this workgroup attends: all, or (mode 3) its split's
    if (p.mode == 3u) {
        lo = gl_WorkGroupID.z * p.split_keys;
        if (lo >= T) return;  // a split past this row's keys (uniform: before any barrier)
        hi = min(T, lo + p.split_keys);
    }
    uint cbase = row.w + kvh * p.max_seq;  // the cache row of this KV head's position 0 in this sequence's slot
    uint kbase = i * p.qkv_stride + p.k_off + kvh * HD;  // this token's key, rotated once into shared memory
    // The row's query, key and value are read in one round of loads; its key and value go to the cache at the end
    // (no workgroup of this dispatch reads them there), where the stores delay nothing
    for (uint d = tid; d < HD; d += WG) {
        qs[d] = rotated(i * p.qkv_stride + h * HD, d, pos);
        kn[d] = as_cached(rotated(kbase, d, pos));
        vn[d] = as_cached(qkv[i * p.qkv_stride + p.v_off + kvh * HD + d]);
    }
    barrier();
    bool stores = h % p.group == 0u && (p.mode <= 1u || (p.mode == 3u && gl_WorkGroupID.z == 0u));
    if (p.mode == 1u) {  // uniform: no barrier follows for anyone of this workgroup
        store_row(stores, cbase + pos);
        return;
    }
    float m = -1e30, l = 0.0;
    vec4 acc[E];
    for (uint k = 0; k < E; k++) acc[k] = vec4(0.0);
    for (uint c0 = lo; c0 < hi; c0 += CH) {
        uint cn = min(CH, hi - c0);
        float lmax = -1e30;
        // The first VU values of this thread's value sum (its first (4 dims, split) pair) are loaded now, while the
        // keys are scored, on which they do not depend (H100, TinyLlama: the decode's attention step 5% faster)
        vec4 early[VU];
        uint d4e = tid % H4, kse = tid / H4;
        bool loaded = tid < H4 * KS && kse + (VU - 1u) * KS < cn && c0 + kse + (VU - 1u) * KS < start;
        if (loaded) {
            [[unroll]] for (uint u = 0; u < VU; u++) early[u] = widen(vc[(cbase + c0 + kse + u * KS) * H4 + d4e]);
        }
        for (uint j = tid; j < cn; j += WG) {
            uint t = c0 + j;
            float sc = 0.0;
            if (t < start) {
                uint kb = (cbase + t) * H4;
                for (uint d4 = 0; d4 < H4; d4++)
                    sc += dot(vec4(qs[4 * d4], qs[4 * d4 + 1], qs[4 * d4 + 2], qs[4 * d4 + 3]), widen(kc[kb + d4]));
            } else if (t == pos) {
                for (uint d = 0; d < HD; d++) sc += qs[d] * kn[d];
            } else {  // an earlier token of this segment in this pass (mode 0): rotated here
                uint kb = (first + t - start) * p.qkv_stride + p.k_off + kvh * HD;
                for (uint d = 0; d < HD; d++) sc += qs[d] * as_cached(rotated(kb, d, t));
            }
            sc *= p.scale;
            s[j] = sc;
            lmax = max(lmax, sc);
        }
        float mnew = max(m, wg_max(lmax));
        float alpha = exp(m - mnew);
        float lsum = 0.0;
        for (uint j = tid; j < cn; j += WG) {
            float e = exp(s[j] - mnew);
            s[j] = e;
            lsum += e;
        }
        l = l * alpha + wg_sum(lsum);
        for (uint k = 0; k < E; k++) {
            uint e = tid + k * WG;
            if (e >= H4 * KS) break;
            uint d4 = e % H4, ks = e / H4;
            vec4 sum = acc[k] * alpha;
            vec4 own = vec4(vn[4 * d4], vn[4 * d4 + 1], vn[4 * d4 + 2], vn[4 * d4 + 3]);  // (key pos)
            uint j = ks, base = cbase * H4 + d4;
            if (k == 0u && loaded) {  // (the batch of the loop below, loaded early)
                [[unroll]] for (uint u = 0; u < VU; u++) sum += s[j + u * KS] * early[u];
                j += VU * KS;
            }
            for (; j + (VU - 1u) * KS < cn && c0 + j + (VU - 1u) * KS < start; j += VU * KS) {  // VU loads in flight
                vec4 v[VU];
                [[unroll]] for (uint u = 0; u < VU; u++) v[u] = widen(vc[base + (c0 + j + u * KS) * H4]);
                [[unroll]] for (uint u = 0; u < VU; u++) sum += s[j + u * KS] * v[u];
            }
            for (; j < cn; j += KS) {
                uint t = c0 + j;
                sum += s[j] * (t < start ? widen(vc[base + t * H4]) : t == pos ? own
                                                                                : value(first + t - start, kvh, d4));
            }
            acc[k] = sum;
        }
        m = mnew;
        barrier();
    }
    for (uint k = 0; k < E; k++) {
        uint e = tid + k * WG;
        if (e < H4 * KS) comb[e] = acc[k];
    }
    barrier();
    uint at = ((i * gl_NumWorkGroups.x + h) * p.splits + gl_WorkGroupID.z) * (HD + 2u);  // mode 3's place in part
    if (p.mode == 3u && tid == 0u) {
        part[at] = m;
        part[at + 1u] = l;
    }
    for (uint d = tid; d < HD; d += WG) {
        float sum = 0.0;
        for (uint ks = 0; ks < KS; ks++) sum += comb[ks * H4 + d / 4][d % 4];
        if (p.mode == 3u)
            part[at + 2u + d] = sum;
        else
            o[i * p.o_stride + h * HD + d] = res[d] = sum / l;
    }
    store_row(stores, cbase + pos);
    if (p.round != 0u) round_head(i, h);
}
