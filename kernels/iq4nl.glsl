// IQ4_NL as GGUF stores it, with the 2-byte scale moved out (as q4_0.glsl): per block 16 bytes (one uvec4) whose
// byte j holds element j (low nibble) and element 16 + j (high nibble), value table[nibble] * scale: the file's
// table (spmd/quants.IQ4_NL_VALUES), whose values are integers of 8 bits (as Q8_0's).
const uint UV = 1;
const uint QUANT = 1;
struct Raw { uvec4 q; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0]); }
// The table as bytes of value + 128 (0..255), value n at byte n % 4 of word n / 4, picked by selects: a constant
// array indexed by a varying nibble lives in memory on NVIDIA (its first version, decode 4x slower than Q4_0's).
const uvec4 TABLE = uvec4(0x3F2D1801u, 0x766A5D4Fu, 0xA6998D81u, 0xF1D9C5B5u);
uvec4 biased(uvec4 n) {  // value + 128 of each nibble n
    bvec4 b4 = notEqual(n & 4u, uvec4(0u));
    uvec4 w = mix(mix(uvec4(TABLE.x), uvec4(TABLE.y), b4), mix(uvec4(TABLE.z), uvec4(TABLE.w), b4),
                  notEqual(n & 8u, uvec4(0u)));
    return (w >> (8u * (n & 3u))) & 255u;
}
vec4 deq(Raw r, uint j) {  // elements 4j..4j+3 (j < 8): value + 128 in the low bits of 2^23, less 2^23 + 128
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    uvec4 n = (uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u;
    return uintBitsToFloat(biased(n) | 0x4B000000u) - 8388736.0;
}
#ifdef INT8
const int OFFSET = 0;
uvec4 int8_half(Raw r, uint h) {  // elements 16h..16h+15 as signed bytes, the table's values
    uvec4 q;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        uvec4 v = biased((uvec4(r.q[k] >> (4u * h)) >> uvec4(0u, 8u, 16u, 24u)) & 15u) << uvec4(0u, 8u, 16u, 24u);
        q[k] = (v.x | v.y | v.z | v.w) ^ 0x80808080u;  // value + 128 ^ 128: the value's byte
    }
    return q;
}
int idot(Raw r, uvec4 x0, uvec4 x1) {  // the block's integer dot product with 8-bit activations x0, x1
    uvec4 w0 = int8_half(r, 0u), w1 = int8_half(r, 1u);
    int i = 0;
    [[unroll]] for (uint k = 0; k < 4; k++) i = dot8_acc(x1[k], w1[k], dot8_acc(x0[k], w0[k], i, 0), 0);
    return i;
}
#endif
