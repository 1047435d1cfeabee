#version 450
// a one-token decode's first RMSNorm input and sum of squares from the x the host wrote (see embed_main.glsl).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#define FROM_X
#include "common.glsl"
#include "f32.glsl"
#include "embed_main.glsl"
