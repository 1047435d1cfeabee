// Q4_K kept whole (no slice cutting its 256-element super-blocks): q4m.glsl's blocks of nibbles, and in the scales
// buffer each super-block's first 16 bytes as the file has them (4 words a super-block, 2 bytes a block: 4.5 bits a
// weight, as the file): d and dmin (fp16), then 12 bytes of 6-bit scales sc and mins m (spmd/quants.k_scales).
// META makes block blk's q4m words from them: d * sc and -dmin * m, exact in float32, so the numbers are q4m's.
#include "q4m.glsl"
#undef META
#define META(buf, blk) q4k_meta(uvec4(buf[((blk) >> 3) * 4u], buf[((blk) >> 3) * 4u + 1u], \
                                      buf[((blk) >> 3) * 4u + 2u], buf[((blk) >> 3) * 4u + 3u]), (blk) & 7u)
uvec4 q4k_meta(uvec4 sb, uint j) {  // super-block words sb, its block j (< 8) -> (scale, min) as q4m's words
    uint at = 8u * (j & 3u);
    uint a = (sb.y >> at) & 255u, b = (sb.z >> at) & 255u, c = (sb.w >> at) & 255u;  // bytes j%4, 4+j%4, 8+j%4
    uint sc = j < 4u ? a & 63u : (c & 15u) | ((a >> 6) << 4);
    uint m = j < 4u ? b & 63u : (c >> 4) | ((b >> 6) << 4);
    vec2 dm = unpackHalf2x16(sb.x);
    return uvec4(floatBitsToUint(dm.x * float(sc)), floatBitsToUint(-(dm.y * float(m))), 0u, 0u);
}
