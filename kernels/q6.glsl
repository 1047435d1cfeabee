// Q6_K, as spmd/backends/vulkan.py repacks it: per 32-element block the 16 bytes of low nibbles of q4m.glsl, and
// 3 words in the scales buffer (7 bits a weight against the file's 6.5625): the word of its halves' scales
// (half_scales.glsl), then the top two bits of each element (element e: bits 2(e % 16) of word 1 + e / 16).
// value = d * sc of its half * (q - 32). META only gathers the words (see q4k.glsl).
const uint UV = 1;
const uint QUANT = 2;
#define META(buf, blk) uvec4(buf[3u * (blk)], buf[3u * (blk) + 1u], buf[3u * (blk) + 2u], 0u)
struct Raw { uvec4 q; uvec4 m; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0], meta); }
float meta_scale(uvec4 meta) { return 1.0; }
float meta_min(uvec4 meta) { return 0.0; }
#include "half_scales.glsl"
float half_scale(Raw r, uint h) { return word_half_scale(r.m.x, h); }
vec4 deq_int(Raw r, uint j) {  // q - 32 of elements 4j..4j+3 (j < 8)
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    uvec4 lo = (uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u;
    uvec4 hi = ((uvec4(r.m[1u + (j >> 2)]) >> (uvec4(0u, 2u, 4u, 6u) + 8u * (j & 3u))) & 3u) << 4;
    return uintBitsToFloat(lo | hi | 0x4B000000u) - 8388640.0;
}
vec4 deq(Raw r, uint j) {
    return deq_int(r, j) * half_scale(r, j >> 2);
}
#ifdef INT8
uvec4 int8_half(Raw r, uint h) {  // q - 32 of elements 16h..16h+15 as signed bytes
    uvec4 q;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        uint t = (r.m[1u + h] >> (8u * k)) & 0xFFu;  // the top bits of elements 16h + 4k + i at bits 2i
        uint v = ((r.q[k] >> (4u * h)) & 0x0F0F0F0Fu) | (spread_2bit(t) << 4);  // q, 0..63 a byte
        q[k] = ((v | 0x80808080u) - 0x20202020u) ^ 0x80808080u;  // q - 32 a byte, no borrow across bytes
    }
    return q;
}
#include "half_scales_int8.glsl"
#endif
