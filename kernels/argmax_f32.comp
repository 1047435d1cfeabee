#version 450
// A chained greedy decode's choice (spmd/backends/vulkan_model.py `ahead`): the first of the largest logits among
// ids 0..n-1 (ties to the lower id, as spmd.sampling's greedy pick), written as the next token (chain[0]) and as
// chain token p.at (chain[1 + 2 at]), with whether the step path would call its logits finite (chain[2 + 2 at]: 1
// or 0): none is NaN or +infinity and the largest is not -infinity (spmd.comm.best's greedy candidate, which
// np.argmax makes the first NaN where there is one);
// then row 0 of the attention kernel's row table moves on one position (its position and its segment's start).
// One workgroup.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(push_constant) uniform Push {
    uint n;   // logits to choose from (the ids the tokenizer knows)
    uint at;  // this token's place in the chain
} p;
layout(std430, binding = 0) readonly buffer Logits { float logits[]; };
layout(std430, binding = 1) buffer Chain { uint chain[]; };
layout(std430, binding = 2) buffer Rows { uvec4 rows[]; };
shared float best_v[gl_WorkGroupSize.x];
shared uint best_i[gl_WorkGroupSize.x];
shared uint all_finite[gl_WorkGroupSize.x];

void main() {
    uint tid = gl_LocalInvocationID.x;
    float v = uintBitsToFloat(0xFF800000u);  // -infinity
    uint at = p.n;  // none yet
    bool finite = true;
    for (uint k = tid; k < p.n; k += gl_WorkGroupSize.x) {
        float l = logits[k];
        finite = finite && l <= 3.4028234663852886e38;  // (false for NaN and +infinity)
        if (l > v || (at == p.n && l == v)) {  // ascending k: the first of equal values stays
            v = l;
            at = k;
        }
    }
    float m = subgroupMax(v);
    uint first = subgroupMin(v == m ? at : 0xFFFFFFFFu), fine = subgroupMin(finite ? 1u : 0u);
    if (subgroupElect()) {
        best_v[gl_SubgroupID] = m;
        best_i[gl_SubgroupID] = first;
        all_finite[gl_SubgroupID] = fine;
    }
    barrier();
    if (tid != 0u) return;
    m = best_v[0];
    first = best_i[0];
    for (uint s = 1; s < gl_NumSubgroups; s++) {
        if (best_v[s] > m || (best_v[s] == m && best_i[s] < first)) {
            m = best_v[s];
            first = best_i[s];
        }
        fine = min(fine, all_finite[s]);
    }
    fine = m >= -3.4028234663852886e38 ? fine : 0u;  // (all -infinity: the step path's candidate is -infinity)
    first = min(first, p.n - 1u);  // (every logit NaN: any id; `fine` says so)
    chain[0] = first;
    chain[1u + 2u * p.at] = first;
    chain[2u + 2u * p.at] = fine;
    uvec4 r = rows[0];
    rows[0] = uvec4(r.x + 1u, r.x + 1u, r.z, r.w);
}
