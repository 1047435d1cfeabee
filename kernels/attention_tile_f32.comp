#version 450
// A prompt's attention, f32 throughout, over keys and values already in the cache (attention_f32 with p.mode 1
// stored this pass's rows first): flash-style, a tile of up to QT query rows of one head shares each chunk of KC
// keys and values read into shared memory, where one workgroup a row read every key once per row.
// Workgroup (h, t): query head h, rows t QT .. t QT + QT - 1 of the pass (fewer at the end). Rows of one tile may
// belong to several segments (a batch of prompts): it takes each run of rows of one segment in turn (rows[i].z, the
// segment's first row, tells them apart; a segment's positions rise with its rows). For each run: its queries
// rotated into shared memory, then per chunk of keys 0..(the run's last position): scores (causal: a key past a
// row's position counts 0), the running maximum and sum of each row (online softmax), and the rows' outputs
// rescaled and summed in shared memory; finally the outputs divided by their sums.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint HD = 64;  // head_dim
const uint H4 = HD / 4;
const uint QT = HD <= 128u ? 16u : 8u;       // query rows a workgroup (spmd/backends/vulkan_model.py: tile_rows)
const uint KC = 2048u / HD;                  // keys a chunk: 8 KiB of keys and 8 of values in shared memory

#include "attention_io.glsl"

shared float qs[QT * HD];   // the run's rotated queries
shared vec4 ks[KC * H4];    // a chunk of keys and values
shared vec4 vs[KC * H4];
shared float sc[QT * KC];   // scores, then their exponentials
shared float os[QT * HD];   // the rows' running output sums
shared float m[QT], l[QT], alpha[QT];

void attend(uint h, uint ra, uint rb) {  // rows ra..rb-1 of the pass: one segment's
    uint WG = gl_WorkGroupSize.x, tid = gl_LocalInvocationID.x, nq = rb - ra;
    uint kvh = h / p.group;
    uint cbase = rows[ra].w + kvh * p.max_seq;  // the cache row of this KV head's position 0 in the segment's slot
    uint last = rows[rb - 1u].x;
    for (uint e = tid; e < nq * HD; e += WG) {
        uint q = e / HD, d = e % HD;
        qs[e] = rotated((ra + q) * p.qkv_stride + h * HD, d, rows[ra + q].x);
        os[e] = 0.0;
    }
    for (uint q = tid; q < nq; q += WG) {
        m[q] = -1e30;
        l[q] = 0.0;
    }
    for (uint c0 = 0; c0 <= last; c0 += KC) {
        uint kn = min(KC, last + 1u - c0);
        barrier();  // the last chunk's values are summed
        for (uint e = tid; e < kn * H4; e += WG) {
            uint at = (cbase + c0 + e / H4) * H4 + e % H4;
            ks[e] = kc[at];
            vs[e] = vc[at];
        }
        barrier();
        for (uint e = tid; e < nq * KC; e += WG) {
            uint q = e / KC, j = e % KC;
            float s = 0.0;
            if (j < kn && c0 + j <= rows[ra + q].x) {
                for (uint d4 = 0; d4 < H4; d4++) {
                    uint at = q * HD + 4 * d4;
                    s += dot(vec4(qs[at], qs[at + 1], qs[at + 2], qs[at + 3]), ks[j * H4 + d4]);
                }
                s *= p.scale;
            } else {
                s = -1e30;  // not attended
            }
            sc[e] = s;
        }
        barrier();
        for (uint q = tid; q < nq; q += WG) {
            uint pos = rows[ra + q].x;
            float mx = m[q];
            for (uint j = 0; j < kn; j++) mx = c0 + j <= pos ? max(mx, sc[q * KC + j]) : mx;
            float sum = 0.0;
            for (uint j = 0; j < KC; j++) {
                float e = j < kn && c0 + j <= pos ? exp(sc[q * KC + j] - mx) : 0.0;
                sc[q * KC + j] = e;
                sum += e;
            }
            alpha[q] = exp(m[q] - mx);
            l[q] = l[q] * alpha[q] + sum;
            m[q] = mx;
        }
        barrier();
        for (uint e = tid; e < nq * HD; e += WG) {
            uint q = e / HD, d = e % HD;
            float acc = os[e] * alpha[q];
            for (uint j = 0; j < kn; j++) acc += sc[q * KC + j] * vs[j * H4 + d / 4][d % 4];
            os[e] = acc;
        }
    }
    barrier();
    for (uint e = tid; e < nq * HD; e += WG) {
        uint q = e / HD, d = e % HD;
        o[(ra + q) * p.o_stride + h * HD + d] = os[e] / l[q];
    }
    barrier();  // before the next run overwrites the shared arrays
}

void main() {
    uint h = gl_WorkGroupID.x, r = gl_WorkGroupID.y * QT, end = min(r + QT, p.n);
    while (r < end) {  // uniform: every thread walks the same runs
        uint rb = r + 1u;
        while (rb < end && rows[rb].z == rows[r].z) rb++;
        attend(h, r, rb);
        r = rb;
    }
}
