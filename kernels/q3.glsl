// Q3_K, as spmd/backends/vulkan.py repacks it: a 32-element block in one uvec4 (4 bits a weight against the file's
// 3.44, and no scales buffer): words 0 and 1 the low two bits of each element's stored integer q + 4 (0..7; element
// 16h + i at bits 2i of word h), word 2 its third bits (element e at bit e), word 3 the word of its halves' scales
// (half_scales.glsl). value = d * sc of its half * q, q in -4..3.
const uint UV = 1;
const uint QUANT = 0;
struct Raw { uvec4 q; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0]); }
#include "half_scales.glsl"
float half_scale(Raw r, uint h) { return word_half_scale(r.q.w, h); }
vec4 deq_int(Raw r, uint j) {  // q of elements 4j..4j+3 (j < 8): q + 4 in the low bits of 2^23, less 2^23 + 4
    uvec4 lo = (uvec4(r.q[j >> 2]) >> (uvec4(0u, 2u, 4u, 6u) + 8u * (j & 3u))) & 3u;
    uvec4 hi = (uvec4(r.q.z) >> (uvec4(0u, 1u, 2u, 3u) + 4u * j)) & 1u;
    return uintBitsToFloat(lo | (hi << 2) | 0x4B000000u) - 8388612.0;
}
vec4 deq(Raw r, uint j) {
    return deq_int(r, j) * half_scale(r, j >> 2);
}
#ifdef INT8
uvec4 int8_half(Raw r, uint h) {  // q of elements 16h..16h+15 as signed bytes
    uvec4 q;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        uint low = spread_2bit((r.q[h] >> (8u * k)) & 0xFFu);  // elements 16h + 4k + i: byte i
        uint third = (((r.q.z >> (16u * h + 4u * k)) & 15u) * 0x00204081u) & 0x01010101u;  // bit i to byte i
        uint v = low | (third << 2);  // q + 4, 0..7 a byte
        q[k] = ((v | 0x80808080u) - 0x04040404u) ^ 0x80808080u;  // q a byte, no borrow across bytes
    }
    return q;
}
#include "half_scales_int8.glsl"
#endif
