#version 450
// attention with float16 keys and values in the KV cache, --kv-cache f16 (see attention_main.glsl).
#extension GL_GOOGLE_include_directive : require
#define KV_F16
#include "common.glsl"
#include "attention_main.glsl"
