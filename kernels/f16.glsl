// F16: 32 halves per block (four uvec4), the file's row padded with zeros to a multiple of 32.
const uint UV = 4;
const uint QUANT = 0;
struct Raw { uvec4 v[4]; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q); }
vec4 deq(Raw r, uint j) {
    uvec4 q = r.v[j >> 1];
    return (j & 1u) == 0u ? vec4(unpackHalf2x16(q.x), unpackHalf2x16(q.y))
                          : vec4(unpackHalf2x16(q.z), unpackHalf2x16(q.w));
}
