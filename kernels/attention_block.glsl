// The body of attention_block_f32.comp and attention_block_kv16.comp: a prompt's attention (flash-style) after
// attention_main's mode 1 has stored every row's key and value in its slot's cache. Workgroup (h, b): query head h
// for rows BQ * b .. BQ * b + BQ - 1 of the pass, 4 threads a row, each holding a quarter of the row's rotated query
// and of its output (dims 4e + part: the 4 threads of a row read neighbouring words of shared memory). The rows
// go a segment at a time (a pass stacks segments of several sequences, each in its own cache slot); for each, tiles
// of TK keys and values of its slot are loaded into shared memory once for all its rows of the block, and each row
// scores them (its 4 threads are a quad of the subgroup: their partial dot products summed by two quad swaps, the
// same bits in each), masks those past its position, and sums
// the values with a running (online) softmax: where one workgroup a (head, row) read every key it attends from
// memory, here each is read once a block of BQ rows. float32 arithmetic; the keys and values are the cache's.
#extension GL_KHR_shader_subgroup_quad : require
#include "attention_io.glsl"
const uint BQ = gl_WorkGroupSize.x / 4;  // rows a workgroup (vulkan_model's BLOCK_ROWS)
const uint D = HD / 4;        // dims a thread holds
const uint TK = 4096 / HD;    // keys a tile: 32 KiB of shared memory for its keys and values
shared float ks[TK * HD], vs[TK * HD];

void main() {
    uint h = gl_WorkGroupID.x, tid = gl_LocalInvocationID.x, kvh = h / p.group;
    // a row's 4 threads: a quad of lanes in one subgroup, by lane number (whatever the subgroups' order in the
    // workgroup; 4 * BQ threads make whole subgroups of 4 or more lanes)
    uint lane = gl_SubgroupID * gl_SubgroupSize + gl_SubgroupInvocationID, part_ = lane % 4u;
    uint b0 = gl_WorkGroupID.y * BQ, b1 = min(b0 + BQ, p.n), i = b0 + lane / 4u;
    for (uint r = b0; r < b1;) {  // a segment's rows of this block: r .. e - 1
        uint seg = rows[r].z, e = r + 1u;
        while (e < b1 && rows[e].z == seg) e++;
        bool mine = i >= r && i < e;
        uint pos = mine ? rows[i].x : 0u, last = rows[e - 1u].x;
        uint cbase = rows[r].w + kvh * p.max_seq;
        float q[D], acc[D];
        for (uint k = 0; k < D; k++) {
            q[k] = mine ? rotated(i * p.qkv_stride + h * HD, 4u * k + part_, pos) : 0.0;
            acc[k] = 0.0;
        }
        float m = -1e30, l = 0.0;
        for (uint t0 = 0; t0 <= last; t0 += TK) {
            barrier();  // the last tile's readers are done
            for (uint v = tid; v < TK * H4; v += gl_WorkGroupSize.x) {
                uint t = t0 + v / H4, at = (cbase + min(t, last)) * H4 + v % H4;
                vec4 kv = widen(kc[at]), vv = widen(vc[at]);
                for (uint c = 0; c < 4u; c++) {
                    ks[4u * v + c] = kv[c];
                    vs[4u * v + c] = vv[c];
                }
            }
            barrier();
            float sc[TK];
            float mt = -1e30;
            for (uint j = 0; j < TK; j++) {
                float d = 0.0;
                for (uint k = 0; k < D; k++) d += q[k] * ks[j * HD + 4u * k + part_];
                d += subgroupQuadSwapHorizontal(d);  // (d0 + d1) + (d2 + d3) in every thread of the row
                d = (d + subgroupQuadSwapVertical(d)) * p.scale;
                sc[j] = mine && t0 + j <= pos ? d : -1e30;
                mt = max(mt, sc[j]);
            }
            float mnew = max(m, mt), alpha = exp(m - mnew);
            l *= alpha;
            for (uint k = 0; k < D; k++) acc[k] *= alpha;
            for (uint j = 0; j < TK; j++) {
                if (sc[j] > -1e30) {  // (a masked key's value is not read: 0 * an infinite one would be NaN)
                    float e_ = exp(sc[j] - mnew);
                    l += e_;
                    for (uint k = 0; k < D; k++) acc[k] += e_ * vs[j * HD + 4u * k + part_];
                }
            }
            m = mnew;
        }
        if (mine)
            for (uint k = 0; k < D; k++) o[i * p.o_stride + h * HD + 4u * k + part_] = acc[k] / l;
        r = e;
    }
}
