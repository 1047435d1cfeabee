#version 450
// attention with float16 keys and values in the KV cache (--kv-cache f16), each key scored by a quad of
// threads, for devices with subgroup quad operations (see attention_main.glsl).
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_quad : require
#define KV_F16
#define KEY_QUADS
#include "common.glsl"
#include "attention_main.glsl"
