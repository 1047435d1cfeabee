#version 450
// attention_block: a prompt's attention in blocks of rows (see attention_block.glsl)
#extension GL_GOOGLE_include_directive : require

#include "common.glsl"
#include "attention_block.glsl"
