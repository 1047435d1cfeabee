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
// Mode 1 has a workgroup per KV head (as its first query head, which stores), which rotates no query.
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
const uint KL = 4;                           // vec4 of a cached key each of its threads scores
const uint KC = (H4 + KL - 1u) / KL;         // threads a cached key
const uint KP = gl_WorkGroupSize.x / KC;     // cached keys a pass scores (gl_WorkGroupSize.x >= KC)
const uint PB = 2;                           // passes loaded at once (8 vec4 a thread; 4 were no faster on an
                                             // H100 and took 187 registers a thread)

shared float red_scratch[gl_WorkGroupSize.x];
#include "reduce.glsl"
shared float s[CH];
shared float sp[2u * PB * gl_WorkGroupSize.x];  // a batch's keys' KC partial dot products each (two in turn)
shared float qs[HD];
shared float kn[HD];
shared float vn[HD];        // this row's value (as the cache holds it), stored with its key at the end
shared vec4 comb[H4 * KS];
shared float res[HD];       // p.round: the head's output
shared int res_q[HD];       // and its integers
shared vec2 res_d[(HD + 31u) / 32u];  // per block (d, 1 / d): `int8_block`'s
shared uint res_max[(HD + 31u) / 32u];  // per block: the largest |x|'s bits
shared int res_sum[(HD + 31u) / 32u];   // and the sum of its integers

void round_head(uint i, uint h) {
    // res, the head's output (h * HD.. of row i, HD a multiple of 32), rounded to 8 bits a 32-element block as
    // kernels/quantize_f32 rounds it: the same integers, scales and sums, bit for bit. A block's largest |x| (its
    // bits less the sign) and its integers' sum are shared atomics, exact in any order: the bits of floats >= 0
    // order as integers, and a NaN's lie above infinity's, so a NaN or a value over the limit shows in the largest.
    if (HD % 32u != 0u) return;  // (uniform: a specialisation constant; the host asks only for whole blocks)
    uint tid = gl_LocalInvocationID.x, WG = gl_WorkGroupSize.x, nb = p.o_stride / 32u;
    for (uint b = tid; b < HD / 32u; b += WG) {
        res_max[b] = 0u;
        res_sum[b] = 0;
    }
    barrier();
    for (uint e = tid; e < HD; e += WG) atomicMax(res_max[e / 32u], floatBitsToUint(res[e]) & 0x7FFFFFFFu);
    barrier();
    for (uint b = tid; b < HD / 32u; b += WG) {
        float m = uintBitsToFloat(res_max[b]);
        res_d[b] = int8_block(m, !(m <= INT8_LIMIT));
    }
    barrier();
    uint ob = i * nb + h * HD / 32u;  // the head's first block in the row
    for (uint e = tid; e < HD; e += WG) {
        vec2 scale = res_d[e / 32u];
        int q = int8_round(res[e], scale);
        res_q[e] = q;
        atomicAdd(res_sum[e / 32u], q);
        o_rounded[ob * 32u + e] = float(q) * scale.x;
    }
    barrier();
    for (uint w = tid; w < HD / 4u; w += WG)
        oq[ob * 8u + w] = int8_pack(ivec4(res_q[4u * w], res_q[4u * w + 1u], res_q[4u * w + 2u], res_q[4u * w + 3u]));
    for (uint b = tid; b < HD / 32u; b += WG) od[ob + b] = vec2(res_d[b].x, float(res_sum[b]));
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
    // (mode 1's grid has a workgroup per KV head: h its first query head, which stores)
    uint h = gl_WorkGroupID.x * (p.mode == 1u ? p.group : 1u), i = gl_WorkGroupID.y, tid = gl_LocalInvocationID.x;
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
        if (p.mode != 1u)
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
        uint nc = start > c0 ? min(cn, start - c0) : 0u;  // the chunk's keys from the cache: c0..c0+nc-1
        // The first VU values of this thread's value sum (its first (4 dims, split) pair) are loaded now, while the
        // keys are scored, on which they do not depend (H100, TinyLlama: the decode's attention step 5% faster);
        // past the cached keys a load repeats the last one, whose weight is then 0
        vec4 early[VU];
        uint d4e = tid % H4, kse = tid / H4;
        bool loaded = tid < H4 * KS && kse < nc;
        if (loaded) {
            [[unroll]] for (uint u = 0; u < VU; u++)
                early[u] = widen(vc[(cbase + c0 + min(kse + u * KS, nc - 1u)) * H4 + d4e]);
        }
        // The cached keys are scored KC threads a key, each KL of its vec4 (lane, lane + KC, ...), in batches of PB
        // passes of KP keys loaded at once: a warp's load then reads a few whole cache lines, where a thread a key had
        // read a line for each of its threads (H100, Llama-2-7B: the step 21 -> 13-14 us). Each thread's dot product
        // goes to sp (a batch's half of it, the next batch's the other), and a thread a key adds the key's KC of them
        // in order into s.
        uint lane = tid % KC;
        vec4 q4[KL];
        [[unroll]] for (uint u = 0; u < KL; u++) {
            uint d4 = min(lane + u * KC, H4 - 1u);
            q4[u] = lane + u * KC < H4 ? vec4(qs[4 * d4], qs[4 * d4 + 1], qs[4 * d4 + 2], qs[4 * d4 + 3]) : vec4(0.0);
        }
        for (uint p0 = 0; p0 * KP < nc; p0 += PB) {
            vec4 kv[PB * KL];
            [[unroll]] for (uint b = 0; b < PB; b++) {
                uint j = (p0 + b) * KP + tid / KC;
                if (tid < KP * KC && j < nc) {
                    [[unroll]] for (uint u = 0; u < KL; u++) {
                        uint d4 = lane + u * KC;
                        kv[b * KL + u] = d4 < H4 ? widen(kc[(cbase + c0 + j) * H4 + min(d4, H4 - 1u)]) : vec4(0.0);
                    }
                }
            }
            uint half_ = (p0 / PB) % 2u * PB * WG;
            [[unroll]] for (uint b = 0; b < PB; b++) {
                uint j = (p0 + b) * KP + tid / KC;
                if (tid < KP * KC && j < nc) {
                    float part = 0.0;
                    [[unroll]] for (uint u = 0; u < KL; u++) part += dot(q4[u], kv[b * KL + u]);
                    sp[half_ + b * KP * KC + tid] = part;
                }
            }
            barrier();
            for (uint jb = tid; jb < PB * KP && p0 * KP + jb < nc; jb += WG) {
                float sc = 0.0;
                for (uint c = 0; c < KC; c++) sc += sp[half_ + jb * KC + c];
                s[p0 * KP + jb] = sc;
            }
        }
        barrier();
        for (uint j = tid; j < cn; j += WG) {
            uint t = c0 + j;
            float sc = 0.0;
            if (t < start) {
                sc = s[j];
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
                [[unroll]] for (uint u = 0; u < VU; u++) {
                    uint ju = j + u * KS;
                    sum += ju < nc ? s[min(ju, CH - 1u)] * early[u] : vec4(0.0);
                }
                j += VU * KS;
            }
            for (; j < nc; j += VU * KS) {  // VU loads in flight, the last batch's past nc repeating key nc - 1
                vec4 v[VU];
                [[unroll]] for (uint u = 0; u < VU; u++)
                    v[u] = widen(vc[base + (c0 + min(j + u * KS, nc - 1u)) * H4]);
                [[unroll]] for (uint u = 0; u < VU; u++) {
                    uint ju = j + u * KS;
                    sum += ju < nc ? s[min(ju, CH - 1u)] * v[u] : vec4(0.0);
                }
            }
            for (j = nc <= ks ? ks : ks + (nc - ks + KS - 1u) / KS * KS; j < cn; j += KS) {  // the keys not cached
                uint t = c0 + j;
                sum += s[j] * (t == pos ? own : value(first + t - start, kvh, d4));
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
