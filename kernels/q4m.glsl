// 4-bit weights with a min (Q4_1, and Q4_K sliced through its super-blocks; q4k.glsl: Q4_K kept whole), as
// spmd/backends/vulkan.py repacks them: per 32-element block 16 bytes (one uvec4) whose byte j holds element j (low
// nibble) and 16 + j (high), and 2 float32 words in the scales buffer, the block's scale s and min m (Q4_K: d * sc
// and -dmin * m, exact in float32): value s * nibble + m.
const uint UV = 1;
const uint QUANT = 2;
#ifndef META  // (q4k.glsl has words of its own)
#define META(buf, blk) uvec4(buf[2u * (blk)], buf[2u * (blk) + 1u], 0u, 0u)  // the block's words
float meta_scale(uvec4 meta) { return uintBitsToFloat(meta.x); }
float meta_min(uvec4 meta) { return uintBitsToFloat(meta.y); }
#endif
#define HAS_MIN
struct Raw { uvec4 q; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0]); }
vec4 deq(Raw r, uint j) {  // elements 4j..4j+3 of the block (j < 8), as integers (see q4_0.glsl's trick)
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    return uintBitsToFloat(((uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u) | 0x4B000000u) - 8388608.0;
}
#ifdef INT8
// 8-bit activations: the nibbles as they are (OFFSET 0; the min comes from the activations' sum, HAS_MIN)
const int OFFSET = 0;
#include "nibbles_int8.glsl"
#endif
