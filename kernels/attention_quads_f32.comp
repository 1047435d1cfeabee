#version 450
// attention with float32 keys and values in the KV cache, each key scored by a quad of
// threads, for devices with subgroup quad operations (see attention_main.glsl).
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_quad : require
#define KEY_QUADS
#include "common.glsl"
#include "attention_main.glsl"
