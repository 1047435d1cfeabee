// 8-bit activations (--activations int8): SPIR-V's packed dot products of 4 x 8 bits (SPV_KHR_integer_dot_product,
// VK_KHR_shader_integer_dot_product; one dp4a instruction on NVIDIA), declared through GL_EXT_spirv_intrinsics
// (the GLSL extension of their own is newer than Debian's glslc). The last argument is the packed vector format:
// 0, four 8-bit integers in a 32-bit word.
#extension GL_EXT_spirv_intrinsics : require
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4453)
int dot8_acc(uint a, uint b, int acc, spirv_literal int packed);   // OpSDotAccSatKHR: signed a . signed b + acc
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4455)
int dot8u_acc(uint a, uint b, int acc, spirv_literal int packed);  // OpSUDotAccSatKHR: signed a . unsigned b + acc
