// Q8_0 / Q4_0's fp16 scale of block blk, where u = d[blk >> 1] (two a uint): matmul_io.glsl, embed_main.glsl.
float block_scale(uint u, uint blk) {
    return unpackHalf2x16((blk & 1u) != 0u ? u >> 16 : u).x;
}
