// F32: 32 floats per block (eight uvec4), the row padded with zeros to a multiple of 32.
const uint UV = 8;
const uint QUANT = 0;
struct Raw { uvec4 v[8]; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q); }
vec4 deq(Raw r, uint j) { return uintBitsToFloat(r.v[j]); }
