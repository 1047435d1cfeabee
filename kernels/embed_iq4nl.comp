#version 450
// embedding row: iq4nl weights (see embed_main.glsl).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#include "iq4nl.glsl"
#include "embed_main.glsl"
