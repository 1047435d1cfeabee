#version 450
// y += x over `count` floats: the allreduced partial sums added into the residual stream (multi-rank runs).
layout(local_size_x = 256) in;
layout(push_constant) uniform Push { uint count; } p;
layout(std430, binding = 0) buffer Y { float y[]; };
layout(std430, binding = 1) readonly buffer X { float x[]; };

void main() {
    uint i = gl_GlobalInvocationID.x;
    if (i < p.count) y[i] += x[i];
}
