// 5-bit weights (Q5_0, Q5_1, and Q5_K sliced through its super-blocks; q5k.glsl: Q5_K kept whole), as
// spmd/backends/vulkan.py repacks them: per 32-element block the 16 bytes of low nibbles of q4m.glsl, and 3 words in
// the scales buffer: the block's scale s and min m as float32 (Q5_0: m = -16 s; Q5_K: d * sc and -dmin * m) and the
// fifth bits (bit e: element e): value s * q + m.
const uint UV = 1;
const uint QUANT = 2;
#ifndef META  // (q5k.glsl has words of its own: its fifth bits are meta.z too)
#define META(buf, blk) uvec4(buf[3u * (blk)], buf[3u * (blk) + 1u], buf[3u * (blk) + 2u], 0u)
float meta_scale(uvec4 meta) { return uintBitsToFloat(meta.x); }
float meta_min(uvec4 meta) { return uintBitsToFloat(meta.y); }
#endif
#define HAS_MIN
struct Raw { uvec4 q; uint h; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0], meta.z); }
vec4 deq(Raw r, uint j) {
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    uvec4 lo = (uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u;
    uvec4 hi = ((uvec4(r.h) >> (uvec4(0u, 1u, 2u, 3u) + 4u * j)) & 1u) << 4;
    return uintBitsToFloat(lo | hi | 0x4B000000u) - 8388608.0;
}
#ifdef INT8
// 8-bit activations (matvec_q5m_i8): q (0..31) as bytes, OFFSET 0; the min comes from the activations' sum (HAS_MIN)
const int OFFSET = 0;
uvec4 int8_half(Raw r, uint h) {  // elements 16h..16h+15
    uvec4 q;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        uint t = (r.h >> (16u * h + 4u * k)) & 15u;  // the fifth bits of elements 16h + 4k .. + 3
        q[k] = ((r.q[k] >> (4u * h)) & 0x0F0F0F0Fu) | (((t * 0x00204081u) & 0x01010101u) << 4);  // bit i to byte i
    }
    return q;
}
int idot(Raw r, uvec4 x0, uvec4 x1) {  // the block's integer dot product with x0 (elements 0..15), x1 (16..31)
    uvec4 w0 = int8_half(r, 0u), w1 = int8_half(r, 1u);
    int i = 0;
    [[unroll]] for (uint k = 0; k < 4; k++) i = dot8u_acc(x1[k], w1[k], dot8u_acc(x0[k], w0[k], i, 0), 0);
    return i;
}
#endif
