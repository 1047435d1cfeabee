// BF16: 32 bfloat16 per block (four uvec4); a bfloat16 is the high half of a float32.
const uint UV = 4;
const uint QUANT = 0;
struct Raw { uvec4 v[4]; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q); }
vec4 deq(Raw r, uint j) {
    uvec4 q = r.v[j >> 1];
    uvec2 u = (j & 1u) == 0u ? q.xy : q.zw;
    return uintBitsToFloat(uvec4(u.x << 16, u.x & 0xFFFF0000u, u.y << 16, u.y & 0xFFFF0000u));
}
