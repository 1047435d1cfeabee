#!/usr/bin/env bash
# llama.cpp, the peer the benchmarks compare against (and its quantiser, which makes the K-quant test files):
# llama-bench and llama-quantize from the sources in the llama-cpp-python sdist. Once per machine; not part of the
# set-up or CI.
#
#   bash scripts/build_llama_cpp.sh [VERSION]          CPU, native: bench-out/llama.cpp/bin (about 8 min on 2 cores)
#   bash scripts/build_llama_cpp.sh --cuda [VERSION]   CUDA (needs nvcc): bench-out/llama.cpp/cuda/bin/llama-bench
#                                                      (about 4 min on 16 cores; CUDA_ARCHITECTURES, default 90)
#   bash scripts/build_llama_cpp.sh --sources [VERSION]  only fetch the sources into bench-out/llama.cpp/src (23 MB:
#                                                      what the two builds need), to carry to a machine with no network
# Needs cmake and a C++ compiler (and ninja for --cuda, where it is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=cpu
case "${1:-}" in
    --cuda|--sources) mode="${1#--}"; shift;;
    -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0;;
esac
version="${1:-0.3.36}"
[[ "$version" =~ ^[0-9]+(\.[0-9]+)*$ ]] || {
    echo "error: $version is not a llama-cpp-python version such as 0.3.36 (--help says what this takes)" >&2; exit 2; }
out="$PWD/bench-out/llama.cpp"
python="${SPMD_VENV:-.venv}/bin/python"
for tool in cmake c++; do
    [ "$mode" = sources ] || command -v "$tool" >/dev/null || {
        echo "error: $tool is not installed (apt-get install cmake g++)" >&2; exit 1; }
done
mkdir -p "$out"
if [ ! -d "$out/src" ]; then
    "$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$out/sdist"
    tar -xzf "$out/sdist/llama_cpp_python-$version.tar.gz" -C "$out"
    mv "$out/llama_cpp_python-$version/vendor/llama.cpp" "$out/src"
    rm -rf "$out/sdist" "$out/llama_cpp_python-$version"
    # keep what llama-bench and llama-quantize build from: the CPU and CUDA backends, common/, two tools
    (cd "$out/src" && rm -rf models docs examples tests pocs media benches gguf-py scripts conversion app skills ci \
        grammars requirements .github)
    for tool in "$out"/src/tools/*/; do
        case "$(basename "$tool")" in llama-bench|quantize) ;; *) rm -rf "$tool";; esac
    done
    printf 'llama_add_compile_flags()\nadd_subdirectory(llama-bench)\nadd_subdirectory(quantize)\n' \
        > "$out/src/tools/CMakeLists.txt"
    for backend in "$out"/src/ggml/src/ggml-*/; do
        case "$(basename "$backend")" in ggml-cpu|ggml-cuda) ;; *) rm -rf "$backend";; esac
    done
fi
common=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF)
case "$mode" in
sources)
    echo "sources in $out/src";;
cpu)
    build_cpu() {  # $1: extra C and C++ flags (empty: none, also when an earlier run's cache holds others)
        cmake -S "$out/src" -B "$out/build" "${common[@]}" -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$1" \
            -DCMAKE_CXX_FLAGS="$1" >/dev/null
        cmake --build "$out/build" -j "$(nproc)" --target llama-bench llama-quantize >/dev/null
    }
    smoke() {  # llama-bench on a tiny model: its exit status (over 128: killed by a signal)
        "$out/build/bin/llama-bench" -m "$tiny" -p 8 -n 1 -r 1 -t 1 >/dev/null 2>&1
    }
    build_cpu ""
    # A CPU with AMX under a hypervisor that does not keep its tile state (seen here, 2026-12-01: a Xeon whose
    # native build crashed at its first product, signal 11) gets a native build without AMX's instructions
    tiny="$out/smoke.gguf"
    if grep -qw amx_tile /proc/cpuinfo && "$python" -c "import sys; from spmd.synth import Shape, write_model
write_model(sys.argv[1], Shape(), 'Q4_0', 0)" "$tiny" 2>/dev/null; then
        status=0
        smoke || status=$?
        if [ "$status" -gt 128 ]; then
            echo "llama-bench was killed by signal $((status - 128)) with AMX on this machine: building it again" \
                "without AMX" >&2
            build_cpu "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            status=0
            smoke || status=$?
        fi
        rm -f "$tiny"
        if [ "$status" -ne 0 ]; then
            echo "error: llama-bench fails on a tiny model (exit status $status)" >&2; exit 1
        fi
    fi
    mkdir -p "$out/bin"
    cp "$out/build/bin/llama-bench" "$out/build/bin/llama-quantize" "$out/bin/"
    echo "built $out/bin/llama-bench and $out/bin/llama-quantize (llama.cpp from llama-cpp-python $version)";;
cuda)
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    cmake -S "$out/src" -B "$out/cuda-build" "${generator[@]}" "${common[@]}" -DGGML_CUDA=ON -DGGML_NATIVE=OFF \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-90}" -DGGML_CUDA_NCCL=OFF >/dev/null
    cmake --build "$out/cuda-build" -j "$(nproc)" --target llama-bench >/dev/null
    mkdir -p "$out/cuda/bin"
    cp "$out/cuda-build/bin/llama-bench" "$out/cuda/bin/"
    echo "built $out/cuda/bin/llama-bench (llama.cpp CUDA from llama-cpp-python $version)";;
esac
