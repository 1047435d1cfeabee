#version 450
// --activations int8: each 32-element block of a pass's activations rounded to 8 bits (quantize.glsl), written
// twice: as 8-bit integers with (d, the sum of the block's q) for the 8-bit kernels (matvec_*_i8), and as the
// floats q * d that the other products read (so every product of a quantised matrix sees the same activations).
// 8 threads a block, each 4 elements; a token row per y of the grid.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "quantize.glsl"
layout(push_constant) uniform Push {
    uint nb;        // blocks a row (the padded columns / 32)
    uint x_stride;  // floats between rows of x
    uint x_off;     // float offset of row 0 (a multiple of 4)
} p;
layout(std430, binding = 0) readonly buffer Xin { vec4 x[]; };
layout(std430, binding = 1) writeonly buffer Xq { uint xq[]; };   // row i, block b: words 8 (i nb + b) ..
layout(std430, binding = 2) writeonly buffer Xd { vec2 xd[]; };   // row i, block b: i nb + b
layout(std430, binding = 3) writeonly buffer Xr { vec4 xr[]; };   // row i: nb * 32 floats, q * d
shared float top[gl_WorkGroupSize.x];
shared int sums[gl_WorkGroupSize.x];

void main() {
    uint tid = gl_LocalInvocationID.x, i = gl_WorkGroupID.x * gl_WorkGroupSize.x + tid;  // vec4 i of the row
    uint row = gl_WorkGroupID.y, b = i / 8, first = tid & ~7u;  // the block's first thread in the workgroup
    bool live = b < p.nb;  // (gl_WorkGroupSize.x is a multiple of 8: a block never straddles two workgroups)
    vec4 v = live ? x[(p.x_off + row * p.x_stride) / 4 + i] : vec4(0.0);
    vec4 a = abs(v);
    bool over = !all(lessThanEqual(a, vec4(INT8_LIMIT)));  // (NaN compares false; max() may drop a NaN)
    top[tid] = over ? -1.0 : max(max(a.x, a.y), max(a.z, a.w));
    barrier();
    float m = 0.0;
    bool bad = false;
    for (uint k = first; k < first + 8u; k++) {
        m = max(m, top[k]);
        bad = bad || top[k] < 0.0;
    }
    vec2 scale = int8_block(m, bad);
    ivec4 q = int8_round(v, scale);
    sums[tid] = q.x + q.y + q.z + q.w;
    barrier();
    int s = 0;
    for (uint k = first; k < first + 8u; k++) s += sums[k];
    if (live) {
        uint at = row * p.nb * 8 + i;
        xq[at] = int8_pack(q);
        xr[at] = vec4(q) * scale.x;
        if (tid == first) xd[row * p.nb + b] = vec2(scale.x, float(s));
    }
}
