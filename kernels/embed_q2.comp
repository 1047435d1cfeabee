#version 450
// embedding row: q2 weights (see embed_main.glsl).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#include "q2.glsl"
#include "embed_main.glsl"
