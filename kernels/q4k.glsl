// Q4_K kept whole (no slice cutting its 256-element super-blocks): q4m.glsl's blocks of nibbles, and in the scales
// buffer 5 words a super-block (20 bytes for 8 blocks: 4.625 bits a weight against the file's 4.5 and q4m's 6): the
// file's d and dmin (fp16), then its 6-bit scales sc as 8 bytes and mins m as 8 bytes (spmd/quants.k_scales).
// META only gathers block blk's words (d and dmin, the word of its sc, that of its m, and its byte's shift in them),
// so that words loaded a step ahead (coopmat_main.glsl's fetch) wait for nothing; meta_scale and meta_min make
// d * sc and -dmin * m from them, exact in float32: the numbers of q4m's words.
#define META(buf, blk) uvec4(buf[((blk) >> 3) * 5u], buf[((blk) >> 3) * 5u + 1u + (((blk) >> 2) & 1u)], \
                             buf[((blk) >> 3) * 5u + 3u + (((blk) >> 2) & 1u)], 8u * ((blk) & 3u))
float meta_scale(uvec4 meta) { return unpackHalf2x16(meta.x).x * float((meta.y >> meta.w) & 255u); }
float meta_min(uvec4 meta) { return -(unpackHalf2x16(meta.x).y * float((meta.z >> meta.w) & 255u)); }
#include "q4m.glsl"
