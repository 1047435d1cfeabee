#version 450
// A chained greedy decode's choice (spmd/backends/vulkan_model.py `ahead`), a workgroup a row r of the pass (of
// p.rows): the first of the largest of its logits among ids 0..n-1 (ties to the lower id, as spmd.sampling's greedy
// pick), written as the row's next token (chain[r]) and as its token `step` of the chain (chain[2 rows + 2 (step
// rows + r)]), with whether the step path would call its logits finite (the word after: 1 or 0): none is NaN or
// +infinity and the largest is not -infinity (spmd.comm.best's greedy candidate, which np.argmax makes the first NaN
// where there is one); then row r of the attention kernel's row table moves on one position (its position and its
// segment's start). `step` is the row's count of chained steps (chain[rows + r], which the host zeroes and this step
// moves on), so that every step of a chain is the same command buffer; a step past p.most keeps no token.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(push_constant) uniform Push {
    uint n;       // logits to choose from (the ids the tokenizer knows)
    uint most;    // the chain's steps (its room for tokens)
    uint rows;    // rows of the pass
    uint stride;  // floats between rows of logits
} p;
layout(std430, binding = 0) readonly buffer Logits { float logits[]; };
layout(std430, binding = 1) buffer Chain { uint chain[]; };
layout(std430, binding = 2) buffer Rows { uvec4 rows[]; };
shared float best_v[gl_WorkGroupSize.x];
shared uint best_i[gl_WorkGroupSize.x];
shared uint all_finite[gl_WorkGroupSize.x];

void main() {
    uint tid = gl_LocalInvocationID.x, r = gl_WorkGroupID.x;
    float v = uintBitsToFloat(0xFF800000u);  // -infinity
    uint at = p.n;  // none yet
    bool finite = true;
    for (uint k = tid; k < p.n; k += gl_WorkGroupSize.x) {
        float l = logits[r * p.stride + k];
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
    uint step = chain[p.rows + r];
    chain[r] = first;
    chain[p.rows + r] = step + 1u;
    if (step < p.most) {
        uint slot = 2u * p.rows + 2u * (step * p.rows + r);
        chain[slot] = first;
        chain[slot + 1u] = fine;
    }
    uvec4 row = rows[r];
    rows[r] = uvec4(row.x + 1u, row.x + 1u, row.z, row.w);
}
