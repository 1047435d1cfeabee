#!/usr/bin/env bash
# Rebuild every Vulkan kernel: kernels/*.comp -> kernels/*.spv with glslc (Vulkan 1.1, subgroup operations),
# then kernels/MANIFEST, one line per .spv: "<spv> <sha256 of its source and of every kernels/*.glsl>".
# tests/test_vulkan.py recomputes those hashes and fails when a .spv is stale (mtimes mean nothing in a clone).
# glslc comes with `apt-get install glslc` (Debian/Ubuntu) or the Vulkan SDK.
set -euo pipefail
cd "$(dirname "$0")/../kernels"
command -v glslc >/dev/null || { echo "glslc not found: apt-get install glslc (or install the Vulkan SDK)" >&2; exit 1; }
includes=$(cat $(ls *.glsl | LC_ALL=C sort) | sha256sum | cut -d' ' -f1)
: > MANIFEST.tmp
for src in $(ls *.comp | LC_ALL=C sort); do
    spv="${src%.comp}.spv"
    opt=-O
    case "$src" in coopmat_*) opt=;; esac  # shaderc 2023.2's optimiser crashes on them; the driver's optimises
    glslc --target-env=vulkan1.1 $opt -o "$spv" "$src"
    hash=$( (sha256sum < "$src" | cut -d' ' -f1; echo "$includes") | sha256sum | cut -d' ' -f1)
    echo "$spv $hash" >> MANIFEST.tmp
done
mv MANIFEST.tmp MANIFEST
echo "built $(wc -l < MANIFEST) kernels"
