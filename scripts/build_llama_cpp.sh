#!/usr/bin/env bash
# llama.cpp built natively on this machine, the CPU peer the benchmarks compare against (and its quantiser, which
# makes the K-quant test files): llama-bench and llama-quantize from the sources in the llama-cpp-python sdist,
# into bench-out/llama.cpp/bin. About 8 minutes on 2 cores; once per machine; not part of the set-up or CI.
#
#   bash scripts/build_llama_cpp.sh [VERSION]      (default 0.3.36; needs cmake and a C++ compiler)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-0.3.36}"
out="$PWD/bench-out/llama.cpp"
python="${SPMD_VENV:-.venv}/bin/python"
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install cmake g++)" >&2; exit 1; }
done
mkdir -p "$out"
if [ ! -d "$out/src" ]; then
    "$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$out/sdist"
    tar -xzf "$out/sdist/llama_cpp_python-$version.tar.gz" -C "$out"
    mv "$out/llama_cpp_python-$version/vendor/llama.cpp" "$out/src"
    rm -rf "$out/sdist" "$out/llama_cpp_python-$version"
fi
cmake -S "$out/src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    >/dev/null
cmake --build "$out/build" -j "$(nproc)" --target llama-bench llama-quantize >/dev/null
mkdir -p "$out/bin"
cp "$out/build/bin/llama-bench" "$out/build/bin/llama-quantize" "$out/bin/"
echo "built $out/bin/llama-bench and $out/bin/llama-quantize (llama.cpp from llama-cpp-python $version)"
