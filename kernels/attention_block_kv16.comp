#version 450
// attention_block: a prompt's attention in blocks of rows (see attention_block.glsl), float16 cache
#extension GL_GOOGLE_include_directive : require
#define KV_F16
#include "common.glsl"
#include "attention_block.glsl"
