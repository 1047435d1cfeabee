// Q8_0 as GGUF stores it, with the 2-byte scale moved out: per block 32 int8 (two uvec4), value q * scale.
const uint UV = 2;
const uint QUANT = 1;
struct Raw { uvec4 q0; uvec4 q1; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0], q[1]); }
// Byte b (signed) as float without a conversion instruction: b + 128 (flip the sign bit) in the low bits of 2^23,
// then subtract 2^23 + 128; exact (see q4_0.glsl).
vec4 deq(Raw r, uint j) {
    uint u = (j < 4u ? r.q0[j] : r.q1[j - 4u]) ^ 0x80808080u;
    return uintBitsToFloat(((uvec4(u) >> uvec4(0, 8, 16, 24)) & 0xFFu) | 0x4B000000u) - 8388736.0;
}
