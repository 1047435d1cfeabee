#version 450
// h = silu(h) * up over `count` floats: SwiGLU where a layer's gate and up are matrices of different types, so that
// one product cannot take both (matmul_io.glsl's PAIR); as that product's epilogue computes it.
layout(local_size_x = 256) in;
layout(push_constant) uniform Push { uint count; } p;
layout(std430, binding = 0) buffer H { float h[]; };
layout(std430, binding = 1) readonly buffer Up { float up[]; };

void main() {
    uint i = gl_GlobalInvocationID.x;
    if (i < p.count) {
        float gate = h[i];
        h[i] = gate / (1.0 + exp(-gate)) * up[i];
    }
}
