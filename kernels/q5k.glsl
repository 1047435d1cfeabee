// Q5_K kept whole (no slice cutting its 256-element super-blocks): q5m.glsl's blocks of low nibbles, and in the
// scales buffer 13 words a super-block (52 bytes for 8 blocks: 5.625 bits a weight against the file's 5.5 and q5m's
// 7): the file's d and dmin (fp16), then its 6-bit scales and mins a byte each, a block's two in one half-word
// (word 1 + j / 2 holds sc_j, m_j, sc_j+1, m_j+1), then each block's fifth bits (bit e: element e), as q5m's.
// META only gathers block blk's words (d and dmin, the word of its sc and m, its fifth bits, the shift of its
// half-word), as q4k.glsl's does; meta_scale and meta_min make d * sc and -dmin * m, exact in float32: q5m's numbers.
#define META(buf, blk) uvec4(buf[((blk) >> 3) * 13u], buf[((blk) >> 3) * 13u + 1u + (((blk) >> 1) & 3u)], \
                             buf[((blk) >> 3) * 13u + 5u + ((blk) & 7u)], 16u * ((blk) & 1u))
float meta_scale(uvec4 meta) { return unpackHalf2x16(meta.x).x * float((meta.y >> meta.w) & 255u); }
float meta_min(uvec4 meta) { return -(unpackHalf2x16(meta.x).y * float((meta.y >> (meta.w + 8u)) & 255u)); }
#include "q5m.glsl"
