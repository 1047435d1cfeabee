#version 450
// qwen3's per-head RMSNorm of q and k, in place in the qkv buffer, before the attention kernel rotates them:
// workgroup (h, tok) takes head h of token tok, a query head (h < heads, weight g[0..HD)) or a key head (weight
// g[HD..2 HD)): x = x * rsqrt(mean(x^2) + eps) * g. In qkv's rows [q (heads * HD) | k (kv * HD) | v], head h
// starts at h * HD.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(push_constant) uniform Push {
    uint hd;          // head_dim
    uint qkv_stride;  // floats between tokens of qkv
    uint heads;       // query heads (the key heads follow)
    float eps;
} p;
layout(std430, binding = 0) buffer Qkv { float qkv[]; };
layout(std430, binding = 1) readonly buffer G { float g[]; };  // this layer's q weight, then its k weight
shared float red_scratch[gl_WorkGroupSize.x];
#include "reduce.glsl"

void main() {
    uint h = gl_WorkGroupID.x, base = gl_WorkGroupID.y * p.qkv_stride + h * p.hd, wbase = h < p.heads ? 0u : p.hd;
    float ss = 0.0;
    for (uint k = gl_LocalInvocationID.x; k < p.hd; k += gl_WorkGroupSize.x) ss += qkv[base + k] * qkv[base + k];
    float scale = inversesqrt(wg_sum(ss) / float(p.hd) + p.eps);  // every thread has read its elements by now
    for (uint k = gl_LocalInvocationID.x; k < p.hd; k += gl_WorkGroupSize.x)
        qkv[base + k] = qkv[base + k] * scale * g[wbase + k];
}
