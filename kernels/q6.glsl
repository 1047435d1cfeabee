// Q6_K, as spmd/backends/vulkan.py repacks it: per 32-element block the 16 bytes of low nibbles of q4m.glsl, and
// 3 words in the scales buffer (7 bits a weight against the file's 6.5625): the int8 scales sc of its two
// 16-element halves (bytes 0 and 1) and its super-block's d (fp16, the high half), then the top two bits of each
// element (element e: bits 2(e % 16) of word 1 + e / 16). value = d * sc of its half * (q - 32), d * sc exact in
// float32 (`half_scale`); the block itself has scale 1. META only gathers the words (see q4k.glsl).
const uint UV = 1;
const uint QUANT = 2;
#define META(buf, blk) uvec4(buf[3u * (blk)], buf[3u * (blk) + 1u], buf[3u * (blk) + 2u], 0u)
struct Raw { uvec4 q; uvec4 m; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0], meta); }
float meta_scale(uvec4 meta) { return 1.0; }
float meta_min(uvec4 meta) { return 0.0; }
float half_scale(uvec4 meta, uint h) {  // d * sc of half h
    return unpackHalf2x16(meta.x).y * float(bitfieldExtract(int(meta.x), int(8u * h), 8));
}
#define HALF_SCALES  // (coopmat_main.glsl: deq_int's integers take their half's scale, half_scale)
vec4 deq_int(Raw r, uint j) {  // q - 32 of elements 4j..4j+3 (j < 8)
    uint u = r.q[j & 3u];
    uint s = (j >> 2) * 4u;
    uvec4 lo = (uvec4(u) >> uvec4(s, s + 8u, s + 16u, s + 24u)) & 15u;
    uvec4 hi = ((uvec4(r.m[1u + (j >> 2)]) >> (uvec4(0u, 2u, 4u, 6u) + 8u * (j & 3u))) & 3u) << 4;
    return uintBitsToFloat(lo | hi | 0x4B000000u) - 8388640.0;
}
vec4 deq(Raw r, uint j) {
    return deq_int(r, j) * half_scale(r.m, j >> 2);
}
#ifdef INT8
// 8-bit activations (matvec_q6_i8): each half's q - 32 as signed bytes, its dot product with the activations'
// integers scaled by the half's scale (dots_scaled; the block's own scale is 1)
const int OFFSET = 0;
uvec4 int8_half(Raw r, uint h) {  // elements 16h..16h+15
    uvec4 q;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        uint t = (r.m[1u + h] >> (8u * k)) & 0xFFu;  // the top bits of elements 16h + 4k + i at bits 2i
        uint a = t & 0x33u, b = (t >> 2) & 0x33u;  // fields 0, 2 and 1, 3 to bytes 0 and 2, then 1 and 3
        uint top = ((a * 0x1001u) & 0x00030003u) | (((b * 0x1001u) & 0x00030003u) << 8);
        uint v = ((r.q[k] >> (4u * h)) & 0x0F0F0F0Fu) | (top << 4);  // q, 0..63 a byte
        q[k] = ((v | 0x80808080u) - 0x20202020u) ^ 0x80808080u;  // q - 32 a byte, no borrow across bytes
    }
    return q;
}
float dots_scaled(Raw r, uvec4 x0, uvec4 x1) {
    uvec4 w0 = int8_half(r, 0u), w1 = int8_half(r, 1u);
    int i0 = 0, i1 = 0;
    [[unroll]] for (uint k = 0; k < 4; k++) {
        i0 = dot8_acc(x0[k], w0[k], i0, 0);
        i1 = dot8_acc(x1[k], w1[k], i1, 0);
    }
    return float(i0) * half_scale(r.m, 0u) + float(i1) * half_scale(r.m, 1u);
}
#endif
