#!/usr/bin/env bash
# The cloudtrain image recipe: build the job environments under one prefix.
#
#   provision.sh --prefix DIR [--flavor gpu|cpu] [--envs tensorflow[,theano]] [--python PY]
#
# On the real image (ami/, `cloudtrain image build`): --prefix /opt/cloudtrain --flavor gpu.
# For --dry-run the controller runs this same script with --flavor cpu into its cache
# folder, so the recipe is exercised by the tests, not just written.
#
# Each environment is a venv under PREFIX/envs/NAME; PREFIX/image.json records what was
# built. Re-running with the same arguments reuses what is already there.
set -euo pipefail

prefix=""
flavor="gpu"
envs="tensorflow"
python="${CLOUDTRAIN_IMAGE_PYTHON:-python3}"

usage() { sed -n '2,11p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --flavor) flavor="$2"; shift 2 ;;
        --envs) envs="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "provision.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$prefix" ] || usage
case "$flavor" in gpu|cpu) ;; *) echo "provision.sh: --flavor is gpu or cpu" >&2; exit 2 ;; esac

here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$prefix/envs"
step() { printf '[provision] %s\n' "$*"; }

build_venv() {  # NAME PYTHON REQUIREMENTS...
    local name="$1" py="$2"; shift 2
    local env="$prefix/envs/$name"
    if [ -f "$env/.complete" ]; then
        step "$name: already built"
        return
    fi
    rm -rf "$env"
    step "$name: creating a venv with $("$py" --version 2>&1)"
    "$py" -m venv "$env"
    "$env/bin/python" -m pip install --quiet --upgrade pip
    step "$name: installing $*"
    "$env/bin/python" -m pip install --quiet --progress-bar off "$@"
    touch "$env/.complete"
}

IFS=',' read -r -a wanted <<<"$envs"
for name in "${wanted[@]}"; do
    case "$name" in
        tensorflow)
            if [ "$flavor" = gpu ]; then tf="tensorflow[and-cuda]"; else tf="tensorflow-cpu"; fi
            build_venv tensorflow "$python" -r "$here/requirements-tensorflow.txt" "$tf"
            ;;
        *) echo "provision.sh: unknown environment '$name'" >&2; exit 2 ;;
    esac
done

# What was built, for the controller and `cloudtrain doctor`.
"$prefix/envs/${wanted[0]}/bin/python" - "$prefix" "$flavor" "${wanted[@]}" <<'PY'
import json, os, subprocess, sys
prefix, flavor, names = sys.argv[1], sys.argv[2], sys.argv[3:]
envs = {}
for name in names:
    py = os.path.join(prefix, "envs", name, "bin", "python")
    version = subprocess.run([py, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    envs[name] = {"python": py, "python_version": version}
tmp = os.path.join(prefix, "image.json.tmp")
with open(tmp, "w") as out:
    json.dump({"schema": 1, "flavor": flavor, "envs": envs}, out, indent=2)
os.replace(tmp, os.path.join(prefix, "image.json"))
PY
step "done: $prefix"
