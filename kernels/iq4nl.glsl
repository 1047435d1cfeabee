// IQ4_NL as GGUF stores it, with the 2-byte scale moved out (as q4_0.glsl): per block 16 bytes (one uvec4) whose
// byte j holds element j (low nibble) and element 16 + j (high nibble), value VALUES[nibble] * scale: the file's
// table (spmd/quants.IQ4_NL_VALUES), whose values are integers of 8 bits (as Q8_0's).
const uint UV = 1;
const uint QUANT = 1;
struct Raw { uvec4 q; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0]); }
const int VALUES[16] = int[16](-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
vec4 deq(Raw r, uint j) {  // elements 4j..4j+3 of the block (j < 8)
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    uvec4 n = (uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u;
    return vec4(VALUES[n.x], VALUES[n.y], VALUES[n.z], VALUES[n.w]);
}
#ifdef INT8
const int OFFSET = 0;
uvec4 int8_half(Raw r, uint h) {  // elements 16h..16h+15 as signed bytes, the table's values
    uvec4 q;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        uvec4 n = (uvec4(r.q[k] >> (4u * h)) >> uvec4(0u, 8u, 16u, 24u)) & 15u;
        q[k] = uint(VALUES[n.x] & 255) | uint(VALUES[n.y] & 255) << 8 | uint(VALUES[n.z] & 255) << 16
             | uint(VALUES[n.w] & 255) << 24;
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
