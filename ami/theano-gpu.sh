#!/usr/bin/env bash
# The theano environment for the GPU image: UNTESTED (no GPU and no conda channel where
# it was written). Called by provision.sh --flavor gpu --envs theano.
#
#   theano-gpu.sh PREFIX
#
# pygpu/libgpuarray (Theano's GPU backend) come from conda-forge, not PyPI, so this
# environment is a conda prefix at PREFIX/envs/theano, with Python 3.7 and the CUDA
# toolkit named in theano-gpus.json; the rest is lock-theano.txt from PyPI (pinned, hashed).
# Refuses to build on a GPU whose architecture that file does not list.
set -euo pipefail
prefix="$1"
here="$(cd "$(dirname "$0")" && pwd)"
env="$prefix/envs/theano"
conda_root="$prefix/conda"
step() { printf '[provision] %s\n' "$*"; }

read -r cuda archs < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["cuda"], " ".join(d["architectures"]))' "$here/theano-gpus.json")
if command -v nvidia-smi >/dev/null; then
    for cap in $(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d . | sort -u); do
        case " $archs " in
            *" sm_$cap "*) ;;
            *) echo "theano-gpu.sh: this GPU is sm_$cap; the Theano stack (CUDA $cuda) drives only: $archs" >&2; exit 2 ;;
        esac
    done
fi
if [ ! -x "$conda_root/bin/conda" ]; then
    step "theano: installing Miniforge into $conda_root"
    installer="$(mktemp)"
    curl -fsSL -o "$installer" "https://github.com/conda-forge/miniforge/releases/latest/download/Miniforge3-Linux-$(uname -m).sh"
    bash "$installer" -b -p "$conda_root"
    rm -f "$installer"
fi
step "theano: conda env with Python 3.7, pygpu and CUDA $cuda"
"$conda_root/bin/conda" create --yes --quiet --prefix "$env" -c conda-forge \
    "python=3.7" "pygpu=0.7.6" "libgpuarray=0.7.6" "cudatoolkit=$cuda" "cudnn" "mkl-service"
"$env/bin/python" -m pip install --quiet --progress-bar off --require-hashes --no-deps -r "$here/lock-theano.txt"
