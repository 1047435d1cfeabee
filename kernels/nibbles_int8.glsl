// 8-bit activations against a block of 16 bytes of nibbles (q4_0.glsl, q4m.glsl: byte j holds element j in its low
// nibble and element 16 + j in its high one), the nibbles as stored (0..15): the type says what it takes off or adds
// (its OFFSET times the sum of the activations' integers, or a min).
int idot(Raw r, uvec4 x0, uvec4 x1) {  // the block's integer dot product with x0 (elements 0..15), x1 (16..31)
    int i = 0;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        i = dot8u_acc(x0[k], r.q[k] & 0x0F0F0F0Fu, i, 0);
        i = dot8u_acc(x1[k], (r.q[k] >> 4) & 0x0F0F0F0Fu, i, 0);
    }
    return i;
}
uvec4 int8_half(Raw r, uint h) {  // coopmat_*_i8: elements 16h..16h+15 as 8-bit integers
    return (r.q >> (4u * h)) & 0x0F0F0F0Fu;
}
