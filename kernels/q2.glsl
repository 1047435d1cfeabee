// Q2_K, as spmd/backends/vulkan.py repacks it: a 32-element block in one uvec4 (4 bits a weight against the file's
// 2.625, and no scales buffer): words 0 and 1 each element's integer q (0..3; element 16h + i at bits 2i of word h),
// word 2 its super-block's d and minus its dmin (fp16 each), word 3 the file's byte of each 16-element half h (at
// byte h): its scale sc (low nibble) and min m (high). value = d * sc * q - dmin * m: q (d sc) and dmin m are exact
// in float32, so their sum is rounded once, as the host's. Float activations only (as on the cpu backend).
const uint UV = 1;
const uint QUANT = 0;
struct Raw { uvec4 q; };
Raw make_raw(uvec4 q[UV], uvec4 meta) { return Raw(q[0]); }
vec4 deq(Raw r, uint j) {  // elements 4j..4j+3 (j < 8) of half h = j / 4
    uint h = j >> 2, sm = r.q.w >> (8u * h);
    vec2 d = unpackHalf2x16(r.q.z);
    uvec4 q = (uvec4(r.q[h]) >> (uvec4(0u, 2u, 4u, 6u) + 8u * (j & 3u))) & 3u;
    return (uintBitsToFloat(q | 0x4B000000u) - 8388608.0) * (d.x * float(sm & 15u)) + d.y * float((sm >> 4) & 15u);
}
