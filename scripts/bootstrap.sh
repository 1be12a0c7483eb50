#!/usr/bin/env bash
# Installs what v3c needs on a fresh Debian 12 machine (as root; Rust already there), and nothing else:
#   - LLVM/MLIR 22 from Debian's packages (melior, inkwell and the MLIR tools build against /usr/lib/llvm-22);
#   - CUDA command-line tools from PyPI wheels into .tools/ in this checkout (git-ignored):
#     ptxas (nvidia-cuda-nvcc 13.0.88, the GPU machines' CUDA 13.0 driver), cuobjdump + nvdisasm (13.2.51).
# Idempotent: when everything is present it prints one line and exits 0.
# Env: V3C_BOOTSTRAP_NO_CUDA_TOOLS=1 skips the PyPI tools (the compiler then emits PTX only, no cubin).
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
llvm_prefix=/usr/lib/llvm-22
apt_packages=(llvm-22-dev libmlir-22-dev mlir-22-tools libclang-22-dev clang-22 libpolly-22-dev zlib1g-dev libzstd-dev)
tools_dir="$root/.tools/cuda"
nvcc_wheel="nvidia-cuda-nvcc==13.0.88"
objdump_wheels=("nvidia-cuda-cuobjdump==13.2.51" "nvidia-cuda-nvdisasm==13.2.51")

say() { echo "bootstrap: $*"; }
die() { echo "bootstrap: error: $*" >&2; exit 1; }

missing_apt=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_apt+=("$p")
done

if [ ${#missing_apt[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing Debian packages (${missing_apt[*]}); run this script as root to install them"
  say "installing ${missing_apt[*]} (apt-get, a few minutes)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${missing_apt[@]}" >/dev/null \
    || die "apt-get install ${missing_apt[*]} failed"
fi
[ -x "$llvm_prefix/bin/mlir-opt" ] || die "$llvm_prefix/bin/mlir-opt not found after installing ${apt_packages[*]}"

installed_tools=()
if [ "${V3C_BOOTSTRAP_NO_CUDA_TOOLS:-0}" != 1 ]; then
  py=$(command -v python3 || true)
  [ -n "$py" ] || die "python3 not found: it is needed to install ptxas/cuobjdump from PyPI (or set V3C_BOOTSTRAP_NO_CUDA_TOOLS=1)"
  pip_install() { # dir, wheels...
    local dir=$1; shift
    rm -rf "$dir.partial"
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir.partial" "$@" \
      || { rm -rf "$dir.partial"; die "pip install $* failed"; }
    rm -rf "$dir" && mv "$dir.partial" "$dir"
  }
  if [ ! -x "$tools_dir/nvcc/nvidia/cu13/bin/ptxas" ]; then
    say "installing ptxas ($nvcc_wheel) into .tools/"
    pip_install "$tools_dir/nvcc" "$nvcc_wheel"
    installed_tools+=(ptxas)
  fi
  if [ ! -x "$tools_dir/objdump/nvidia/cu13/bin/cuobjdump" ] || [ ! -x "$tools_dir/objdump/nvidia/cu13/bin/nvdisasm" ]; then
    say "installing cuobjdump + nvdisasm (${objdump_wheels[*]}) into .tools/"
    pip_install "$tools_dir/objdump" "${objdump_wheels[@]}"
    installed_tools+=(cuobjdump nvdisasm)
  fi
  # One bin folder the compiler looks in first (compiler/src/toolchain.rs).
  mkdir -p "$root/.tools/bin"
  for t in nvcc/nvidia/cu13/bin/ptxas objdump/nvidia/cu13/bin/cuobjdump objdump/nvidia/cu13/bin/nvdisasm; do
    [ -x "$tools_dir/$t" ] || die "$tools_dir/$t missing after pip install"
    ln -sfn "../cuda/$t" "$root/.tools/bin/$(basename "$t")"
  done
fi

if [ ${#missing_apt[@]} -eq 0 ] && [ ${#installed_tools[@]} -eq 0 ]; then
  say "all present (LLVM/MLIR 22 at $llvm_prefix, CUDA tools in .tools/bin)"
else
  say "done"
fi
