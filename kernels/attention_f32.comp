#version 450
// attention with float32 keys and values in the KV cache (see attention_main.glsl).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "attention_main.glsl"
