// Workgroup reductions of one value (the caller declares `shared float red_scratch[gl_WorkGroupSize.x];`).
// Every thread of the workgroup must call them (they contain barriers); every thread gets the result.
float wg_sum(float v) {
    float s = subgroupAdd(v);
    if (subgroupElect()) red_scratch[gl_SubgroupID] = s;
    barrier();
    float total = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++) total += red_scratch[i];
    barrier();
    return total;
}

float wg_max(float v) {
    float s = subgroupMax(v);
    if (subgroupElect()) red_scratch[gl_SubgroupID] = s;
    barrier();
    float m = red_scratch[0];
    for (uint i = 1; i < gl_NumSubgroups; i++) m = max(m, red_scratch[i]);
    barrier();
    return m;
}
