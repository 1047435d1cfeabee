// Declarations and helpers of the attention kernels (attention_main.glsl: one query head of one row a workgroup;
// attention_block.glsl: a prompt's rows in blocks), for float32 caches or (KV_F16) float16 ones.
layout(constant_id = 1) const uint HD = 64;  // head_dim
const uint H4 = HD / 4;                      // head_dim is a multiple of 4: the cache is read as vec4

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
    uint mode;        // 0: store this row's key and value, and attend (passes of few rows); larger passes in two
                      // dispatches: 1: store only, 2: attend only, every key and value from the cache; a decode
                      // step over a long cache in two: 3: each workgroup (h, i, split) attends keys
                      // split * split_keys.. (as mode 0: the row's own from qkv, split 0 stores it) and writes
                      // its partial softmax to `part`, 4: (h, i) combines them
    uint splits;      // modes 3, 4: the splits a (head, row) has in `part` (the mode 3 grid's depth)
    uint split_keys;  // modes 3, 4: keys a split holds (at most CH)
    uint n;           // rows of the pass (attention_block)
    uint round;       // modes 0, 4 (--activations int8, a one-token decode): 1: also write the output rounded to 8
                      // bits a block (bindings 7-9, as kernels/quantize_f32 writes rows of o_stride floats)
} p;
// per row: (position, its segment's first position, the segment's first row in this pass, the slot's first
// cache row: slot * kv * max_seq)
layout(std430, binding = 0) readonly buffer Rows { uvec4 rows[]; };
layout(std430, binding = 1) readonly buffer Qkv { float qkv[]; };
layout(std430, binding = 2) readonly buffer RopeT { float rope[]; };  // cos (max_seq, rope_dim/2), then sin
#ifdef KV_F16
layout(std430, binding = 3) buffer KCache { uvec2 kc[]; };  // this layer's keys (slots, kv, max_seq, HD), 4 a uvec2
layout(std430, binding = 4) buffer VCache { uvec2 vc[]; };
// x as the cache holds it: the nearest float16 value, ties to even (numpy's astype(float16)), in float32. Done
// with integer logic: a driver may fold a float16 round trip in registers away (NVIDIA's did), and packHalf2x16's
// rounding is the implementation's; this makes the value, and then packing it is exact.
float as_cached(float x) {
    if (abs(x) < 6.103515625e-05) return roundEven(x * 16777216.0) * 5.9604644775390625e-08;  // subnormal: 2^-24
    uint u = floatBitsToUint(x);
    float r = uintBitsToFloat((u + 0x0FFFu + ((u >> 13) & 1u)) & 0xFFFFE000u);  // 10 bits of mantissa kept
    return abs(r) > 65504.0 ? sign(x) * uintBitsToFloat(0x7F800000u) : r;  // past float16's largest: infinite
}
vec4 widen(uvec2 u) { return vec4(unpackHalf2x16(u.x), unpackHalf2x16(u.y)); }
uvec2 narrow(vec4 v) {
    return uvec2(packHalf2x16(vec2(as_cached(v.x), as_cached(v.y))), packHalf2x16(vec2(as_cached(v.z), as_cached(v.w))));
}
#else
layout(std430, binding = 3) buffer KCache { vec4 kc[]; };   // this layer's keys (slots, kv, max_seq, HD)
layout(std430, binding = 4) buffer VCache { vec4 vc[]; };
vec4 widen(vec4 v) { return v; }
vec4 narrow(vec4 v) { return v; }
float as_cached(float x) { return x; }
#endif
layout(std430, binding = 5) writeonly buffer Out { float o[]; };
// modes 3, 4: per (row, head, split), ((i * heads + h) * splits + split) * (HD + 2): the split's largest score m,
// its sum l of exp(score - m), and its HD sums of exp(score - m) * value
layout(std430, binding = 6) buffer Part { float part[]; };
layout(std430, binding = 7) writeonly buffer Oq { uint oq[]; };   // p.round: row i, block b: words 8 (i nb + b) ..
layout(std430, binding = 8) writeonly buffer Od { vec2 od[]; };   // (d, the sum of the block's q) at i nb + b
layout(std430, binding = 9) writeonly buffer Or { float o_rounded[]; };  // q * d, as o

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

vec4 value(uint r, uint kvh, uint d4) {  // row r of this pass, from the qkv buffer (as the cache holds it)
    uint at = r * p.qkv_stride + p.v_off + kvh * HD + 4 * d4;
    return vec4(as_cached(qkv[at]), as_cached(qkv[at + 1]), as_cached(qkv[at + 2]), as_cached(qkv[at + 3]));
}

