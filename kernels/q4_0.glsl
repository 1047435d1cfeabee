// Q4_0 as GGUF stores it, with the 2-byte scale moved out: per block 16 bytes (one uvec4) whose byte j holds
// element j (low nibble) and element 16 + j (high nibble), value (nibble - 8) * scale.
const uint UV = 1;
const uint QUANT = 1;
struct Raw { uvec4 q; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0]); }
// Nibble n as float: the bits 0x4B000000 | n are 2^23 + n exactly, and subtracting 2^23 + 8 leaves n - 8 exactly:
// integer logic and one float add instead of an integer-to-float conversion (a quarter-rate instruction on NVIDIA).
vec4 deq(Raw r, uint j) {  // elements 4j..4j+3 of the block (j < 8)
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    return uintBitsToFloat(((uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u) | 0x4B000000u) - 8388616.0;
}
#ifdef INT8
// 8-bit activations: the nibbles as stored (0..15); the kernel takes 8 times the sum of the activations' integers
// off (OFFSET), exactly: n - 8.
const int OFFSET = 8;
#include "nibbles_int8.glsl"
#endif
