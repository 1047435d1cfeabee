// Q6_K and Q3_K (q6.glsl, q3.glsl): a block's two 16-element halves each have a scale, d * sc, from one word of
// the block: the int8 scales sc of its halves (bytes 0 and 1) and its super-block's d (fp16, the high half). d * sc
// is exact in float32; the block itself has scale 1. The type defines Raw, half_scale (which word) and int8_half.
#define HALF_SCALES  // (coopmat_main.glsl: deq_int's integers take their half's scale, half_scale)
float word_half_scale(uint word, uint h) {  // d * sc of half h
    return unpackHalf2x16(word).y * float(bitfieldExtract(int(word), int(8u * h), 8));
}
uint spread_2bit(uint t) {  // the 2-bit fields i = 0..3 of t (at bits 2i) to the low bits of bytes 0..3
    uint a = t & 0x33u, b = (t >> 2) & 0x33u;  // fields 0, 2 and 1, 3 to bytes 0 and 2, then 1 and 3
    return ((a * 0x1001u) & 0x00030003u) | (((b * 0x1001u) & 0x00030003u) << 8);
}
