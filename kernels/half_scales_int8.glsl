// 8-bit activations against a type of half_scales.glsl (matvec_q6_i8, matvec_q3_i8): each half's integers as
// signed bytes (the type's int8_half), their dot product with the activations' integers scaled by the half's scale
// (the block's own scale is 1; OFFSET 0)
const int OFFSET = 0;
float dots_scaled(Raw r, uvec4 x0, uvec4 x1) {
    uvec4 w0 = int8_half(r, 0u), w1 = int8_half(r, 1u);
    int i0 = 0, i1 = 0;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        i0 = dot8_acc(x0[k], w0[k], i0, 0);
        i1 = dot8_acc(x1[k], w1[k], i1, 0);
    }
    return float(i0) * half_scale(r, 0u) + float(i1) * half_scale(r, 1u);
}
