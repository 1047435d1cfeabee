// Q6_K, as spmd/backends/vulkan.py repacks it: per 32-element block the 16 bytes of low nibbles of q4m.glsl, and
// MW = 4 words in the scales buffer: the float32 scales d * sc of its two 16-element halves, then the top two bits
// of each element (element e: bits 2(e % 16) of word 2 + e / 16). value = scale of its half * (q - 32); the block
// itself has scale 1.
const uint UV = 1;
const uint QUANT = 2;
#define MW 4u
struct Raw { uvec4 q; uvec4 m; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0], meta); }
float meta_scale(uvec4 meta) { return 1.0; }
float meta_min(uvec4 meta) { return 0.0; }
#define HALF_SCALES  // (coopmat_main.glsl: deq_int's integers take their half's scale, words 0 and 1 of meta)
vec4 deq_int(Raw r, uint j) {  // q - 32 of elements 4j..4j+3 (j < 8)
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    uvec4 lo = (uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u;
    uvec4 hi = ((uvec4(r.m[2u + (j >> 2)]) >> (uvec4(0u, 2u, 4u, 6u) + 8u * (j & 3u))) & 3u) << 4;
    return uintBitsToFloat(lo | hi | 0x4B000000u) - 8388640.0;
}
vec4 deq(Raw r, uint j) {
    return deq_int(r, j) * uintBitsToFloat(r.m[j >> 2]);
}
