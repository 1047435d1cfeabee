// What the attention kernels share (attention_f32.comp: decode, and a prompt's key and value store;
// attention_tile_f32.comp: a prompt's attention): push constants, bindings, RoPE on the fly.
layout(push_constant) uniform Push {
    uint group;       // query heads per KV head
    uint qkv_stride;  // floats between tokens of qkv: [q (heads * HD) | k (kv * HD) | v (kv * HD) | padding]
    uint k_off;       // float offset of k within a token
    uint v_off;       // float offset of v within a token
    uint o_stride;    // floats between tokens of the output (heads * HD, padded)
    uint max_seq;     // positions of a slot's cache (and of the rope tables)
    uint rope_dim;    // leading dims of a head that are rotated
    uint neox;        // 1: pairs (i, i + rope_dim/2); 0: pairs (2i, 2i + 1)
    float scale;      // 1 / sqrt(head_dim)
    uint mode;        // attention_f32: 0: store this row's key and value, and attend (decode); 1: store only (a
                      // prompt's first dispatch, before attention_tile_f32)
    uint n;           // rows of the pass (attention_tile_f32)
} p;
// per row: (position, its segment's first position, the segment's first row in this pass, the slot's first
// cache row: slot * kv * max_seq)
layout(std430, binding = 0) readonly buffer Rows { uvec4 rows[]; };
layout(std430, binding = 1) readonly buffer Qkv { float qkv[]; };
layout(std430, binding = 2) readonly buffer RopeT { float rope[]; };  // cos (max_seq, rope_dim/2), then sin
layout(std430, binding = 3) buffer KCache { vec4 kc[]; };             // this layer's keys (slots, kv, max_seq, HD)
layout(std430, binding = 4) buffer VCache { vec4 vc[]; };
layout(std430, binding = 5) writeonly buffer Out { float o[]; };

float rotated(uint base, uint d, uint position) {
    // element d of the head that starts at qkv[base], rotated for `position`
    if (d >= p.rope_dim) return qkv[base + d];
    uint half_ = p.rope_dim / 2u;
    bool first;
    uint i, ia, ib;
    if (p.neox != 0u) {
        first = d < half_;
        i = first ? d : d - half_;
        ia = i;
        ib = i + half_;
    } else {
        first = (d & 1u) == 0u;
        i = d >> 1;
        ia = 2u * i;
        ib = ia + 1u;
    }
    float c = rope[position * half_ + i], sn = rope[(p.max_seq + position) * half_ + i];
    float xa = qkv[base + ia], xb = qkv[base + ib];
    return first ? xa * c - xb * sn : xa * sn + xb * c;
}

vec4 value(uint r, uint kvh, uint d4) {  // row r of this pass, from the qkv buffer
    uint at = r * p.qkv_stride + p.v_off + kvh * HD + 4 * d4;
    return vec4(qkv[at], qkv[at + 1], qkv[at + 2], qkv[at + 3]);
}

