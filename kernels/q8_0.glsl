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
#ifdef INT8
const int OFFSET = 0;
int idot(Raw r, uvec4 x0, uvec4 x1) {  // the block's integer dot product with 8-bit activations x0 (0..15), x1
    int i = 0;
    [[unroll]] for (uint k = 0; k < 4; k++) i = dot8_acc(x1[k], r.q1[k], dot8_acc(x0[k], r.q0[k], i, 0), 0);
    return i;
}
uvec4 int8_half(Raw r, uint h) { return h == 0u ? r.q0 : r.q1; }  // coopmat_*_i8: elements 16h..16h+15
#endif
