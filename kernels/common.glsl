// Shared by every kernel: workgroup-wide sums and maxima that hold for any subgroup size (8 lanes on lavapipe,
// 32 on NVIDIA, 64 on AMD): subgroupAdd / subgroupMax inside each subgroup, then shared memory across the
// gl_NumSubgroups subgroups of the workgroup.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require

layout(local_size_x_id = 0) in;  // WG: threads per workgroup (specialised per device)
