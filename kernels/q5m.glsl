// 5-bit weights (Q5_0, Q5_1, Q5_K), as spmd/backends/vulkan.py repacks them: per 32-element block the 16 bytes of
// low nibbles of q4m.glsl, and MW = 3 words in the scales buffer: the block's scale s and min m as float32 (Q5_0:
// m = -16 s; Q5_K: d * sc and -dmin * m) and the fifth bits (bit e: element e): value s * q + m.
const uint UV = 1;
const uint QUANT = 2;
#define MW 3u
#define HAS_MIN
struct Raw { uvec4 q; uint h; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0], meta.z); }
float meta_scale(uvec4 meta) { return uintBitsToFloat(meta.x); }
float meta_min(uvec4 meta) { return uintBitsToFloat(meta.y); }
vec4 deq(Raw r, uint j) {
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    uvec4 lo = (uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u;
    uvec4 hi = ((uvec4(r.h) >> (uvec4(0u, 1u, 2u, 3u) + 4u * j)) & 1u) << 4;
    return uintBitsToFloat(lo | hi | 0x4B000000u) - 8388608.0;
}
