#!/usr/bin/env bash
# Build the llama.cpp tools and Python binding the test suite checks our GGUF files against.
#
# Source: the llama.cpp tree vendored in the PyPI sdist of llama-cpp-python==0.3.36
# (llama.cpp commit 0c1e570), so the tools, the shared libraries and the Python binding are one
# consistent version, and nothing but PyPI is needed.
#
# Layout under $LLMQUANT_LLAMACPP_DIR (default ~/.cache/llmquant/llamacpp-0.3.36):
#   sdist/    llama_cpp_python-0.3.36.tar.gz (pip download)
#   src/      the unpacked sdist
#   build/    cmake build tree (Release, shared libs, no tests/examples/server, no curl/openssl)
#   bin/      llama-quantize, llama-perplexity, llama-imatrix, llama-completion and the shared
#             libraries they use (libllama.so, libggml*.so; binaries find them via $ORIGIN)
#   python/   the llama_cpp Python package (pip --target, built with -DLLAMA_BUILD=OFF, so it
#             compiles nothing) plus its missing pure-Python dependency diskcache; its
#             llama_cpp/lib/ holds copies of the shared libraries of bin/, so
#             `PYTHONPATH=$DIR/python python -c "import llama_cpp"` works without
#             LLAMA_CPP_LIB_PATH. llmquant/evaluate/llamacpp_tools.py does this for the tests.
#
# One compile (about 8 min on 2 cores) serves both the tools and the binding. Idempotent: when
# everything is in place it prints the bin folder and exits 0 at once. Prints the bin folder as
# the last line of stdout on success. Progress goes to stderr.
#
# Usage: bash tools/build_llamacpp.sh        (env: LLMQUANT_LLAMACPP_DIR, LLMQUANT_BUILD_JOBS=2)
set -euo pipefail

VERSION=0.3.36
DIR="${LLMQUANT_LLAMACPP_DIR:-$HOME/.cache/llmquant/llamacpp-$VERSION}"
JOBS="${LLMQUANT_BUILD_JOBS:-2}"
TOOLS=(llama-quantize llama-perplexity llama-imatrix llama-completion)
SDIST="$DIR/sdist/llama_cpp_python-$VERSION.tar.gz"
SRC="$DIR/src/llama_cpp_python-$VERSION"
BUILD="$DIR/build"
BIN="$DIR/bin"
PYDIR="$DIR/python"
PYTHON="${PYTHON:-python3}"

log() { echo "[build_llamacpp] $*" >&2; }

is_complete() {
    local tool
    for tool in "${TOOLS[@]}"; do
        [[ -x "$BIN/$tool" ]] || return 1
    done
    [[ -f "$BIN/libllama.so" && -f "$PYDIR/llama_cpp/lib/libllama.so" ]] || return 1
    [[ -f "$PYDIR/.complete" ]] || return 1
}

if is_complete; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$DIR"

if [[ ! -f "$SDIST" ]]; then
    log "downloading llama-cpp-python==$VERSION sdist"
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" \
        -d "$DIR/sdist.tmp" >&2
    mkdir -p "$DIR/sdist"
    mv "$DIR/sdist.tmp/llama_cpp_python-$VERSION.tar.gz" "$SDIST"
    rm -rf "$DIR/sdist.tmp"
fi

if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    log "unpacking $SDIST"
    rm -rf "$DIR/src.tmp"
    mkdir -p "$DIR/src.tmp"
    tar xzf "$SDIST" -C "$DIR/src.tmp"
    rm -rf "$DIR/src"
    mv "$DIR/src.tmp" "$DIR/src"
fi

if command -v ninja >/dev/null 2>&1; then GENERATOR=Ninja; else GENERATOR="Unix Makefiles"; fi

log "configuring ($GENERATOR) in $BUILD"
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G "$GENERATOR" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >&2

log "building ${TOOLS[*]} with -j$JOBS (about 8 min on 2 cores)"
start=$SECONDS
nice -n 10 cmake --build "$BUILD" --target "${TOOLS[@]}" -j "$JOBS" >&2
log "build took $((SECONDS - start)) s"

mkdir -p "$BIN"
for tool in "${TOOLS[@]}"; do
    cp -f "$BUILD/bin/$tool" "$BIN/$tool.tmp"
    mv -f "$BIN/$tool.tmp" "$BIN/$tool"
done
# Shared libraries are copied with their real names (no versioned symlinks are needed: the
# binaries and libraries link by SONAME, which we recreate as plain files).
shopt -s nullglob
libs=("$BUILD"/bin/lib*.so*)
if ((${#libs[@]} == 0)); then
    log "no shared libraries found in $BUILD/bin"
    exit 1
fi
cp -fL "${libs[@]}" "$BIN/"

log "installing the llama_cpp Python binding (no compile) into $PYDIR"
rm -rf "$PYDIR.tmp"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PYTHON" -m pip install --no-deps \
    --target "$PYDIR.tmp" "$SDIST" "diskcache>=5.6.1" >&2
mkdir -p "$PYDIR.tmp/llama_cpp/lib"
cp -fL "${libs[@]}" "$PYDIR.tmp/llama_cpp/lib/"
PYTHONPATH="$PYDIR.tmp" "$PYTHON" -c "import llama_cpp; print(llama_cpp.__version__)" >&2
touch "$PYDIR.tmp/.complete"
rm -rf "$PYDIR"
mv "$PYDIR.tmp" "$PYDIR"

for tool in "${TOOLS[@]}"; do
    "$BIN/$tool" --help >/dev/null 2>&1 || [[ $? -le 1 ]] || {
        log "$BIN/$tool does not run"
        exit 1
    }
done
log "done"
echo "$BIN"
