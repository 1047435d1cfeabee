// Q4_K kept whole (no slice cutting its 256-element super-blocks): q4m.glsl's blocks of nibbles, and in the scales
// buffer 5 words a super-block (20 bytes for 8 blocks: 4.625 bits a weight against the file's 4.5 and q4m's 6): the
// file's d and dmin (fp16), then its 6-bit scales sc as 8 bytes and mins m as 8 bytes (spmd/quants.k_scales).
// META makes block blk's q4m words from them: d * sc and -dmin * m, exact in float32, so the numbers are q4m's.
#include "q4m.glsl"
#undef META
#define META(buf, blk) q4k_meta(buf[((blk) >> 3) * 5u], buf[((blk) >> 3) * 5u + 1u + (((blk) >> 2) & 1u)], \
                                buf[((blk) >> 3) * 5u + 3u + (((blk) >> 2) & 1u)], (blk) & 3u)
uvec4 q4k_meta(uint dmw, uint scw, uint mw, uint j) {  // d and dmin, the words of sc and m, the block's byte in them
    uint sc = (scw >> (8u * j)) & 255u, m = (mw >> (8u * j)) & 255u;
    vec2 dm = unpackHalf2x16(dmw);
    return uvec4(floatBitsToUint(dm.x * float(sc)), floatBitsToUint(-(dm.y * float(m))), 0u, 0u);
}
