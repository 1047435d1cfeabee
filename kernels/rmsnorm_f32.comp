#version 450
// RMSNorm of one token's residual row: y = x * rsqrt(mean(x^2) + eps) * g. One workgroup per token.
// The products that follow read y as it is (their input padding stays zero: y's padding is never written).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(push_constant) uniform Push {
    uint dim;       // elements of a row
    uint x_stride;  // floats between tokens of x
    uint x_off;     // float offset of the first token in x
    uint y_stride;  // floats between tokens of y
    float eps;
} p;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer G { float g[]; };
layout(std430, binding = 2) writeonly buffer Y { float y[]; };
shared float red_scratch[gl_WorkGroupSize.x];
#include "reduce.glsl"

void main() {
    uint tok = gl_WorkGroupID.x, base = p.x_off + tok * p.x_stride;
    float ss = 0.0;
    for (uint k = gl_LocalInvocationID.x; k < p.dim; k += gl_WorkGroupSize.x) ss += x[base + k] * x[base + k];
    float scale = inversesqrt(wg_sum(ss) / float(p.dim) + p.eps);
    for (uint k = gl_LocalInvocationID.x; k < p.dim; k += gl_WorkGroupSize.x)
        y[tok * p.y_stride + k] = x[base + k] * scale * g[k];
}
