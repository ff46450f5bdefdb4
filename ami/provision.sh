#!/usr/bin/env bash
# The cloudtrain image recipe: build the job environments under one prefix.
#
#   provision.sh --prefix DIR [--flavor gpu|cpu] [--envs tensorflow[,theano]]
#                [--python PY] [--theano-python PY37]
#
# On the real image: --prefix /opt/cloudtrain --flavor gpu (see ami/README.md).
# For --dry-run the controller runs this same script with --flavor cpu into its cache
# folder, so the recipe is exercised by the tests, not just written.
#
# Each environment is PREFIX/envs/NAME (a venv; the GPU theano one a conda prefix) holding
# exactly the pins of its lock file (lock-*.txt, written by lock.sh), hashes checked,
# marked complete by PREFIX/envs/NAME/.complete; PREFIX/image.json records every
# complete environment. Re-running reuses complete environments, so environments
# can be added to an image one at a time.
set -euo pipefail

prefix=""
flavor="gpu"
envs="tensorflow"
python="${CLOUDTRAIN_IMAGE_PYTHON:-python3}"
theano_python="${CLOUDTRAIN_PYTHON37:-python3.7}"

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --flavor) flavor="$2"; shift 2 ;;
        --envs) envs="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --theano-python) theano_python="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "provision.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$prefix" ] || usage
case "$flavor" in gpu|cpu) ;; *) echo "provision.sh: --flavor is gpu or cpu" >&2; exit 2 ;; esac

here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$prefix/envs"
step() { printf '[provision] %s\n' "$*"; }

new_venv() {  # NAME PYTHON LOCK: a fresh venv holding exactly LOCK's pins, each file's hash checked
    local name="$1" py="$2" lock="$3"
    local env="$prefix/envs/$name"
    rm -rf "$env"
    step "$name: creating a venv with $("$py" --version 2>&1)"
    "$py" -m venv "$env"
    step "$name: installing $lock"
    install_lock "$env" "$lock"
}

install_lock() {  # ENV LOCK: LOCK's pins into ENV, nothing else (the lock holds every dependency)
    "$1/bin/python" -m pip install --quiet --progress-bar off --require-hashes --no-deps -r "$here/$2"
}

for_python() {  # PYTHON LOCK: refuse a Python that LOCK's `# pythons:` line does not name
    local wanted version
    wanted="$(sed -n 's/^# pythons: //p' "$here/$2")"
    version="$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' | cut -d. -f1,2)"
    case " $wanted " in
        *" $version "*) ;;
        *) echo "provision.sh: $2 is for Python $wanted; $1 is Python $version" >&2; exit 3 ;;
    esac
}

build_tensorflow() {
    for_python "$python" "lock-tensorflow-$flavor.txt"
    new_venv tensorflow "$python" "lock-tensorflow-$flavor.txt"
    # `keras: 2` jobs: tf-keras (the Keras 2 API, TF_USE_LEGACY_KERAS=1) of TensorFlow's own
    # minor version; on its own, as it names the `tensorflow` wheel, not tensorflow-cpu.
    step "tensorflow: installing lock-tf-keras.txt (the Keras 2 API)"
    install_lock "$prefix/envs/tensorflow" lock-tf-keras.txt
}

build_theano() {
    local env="$prefix/envs/theano"
    if [ "$flavor" = gpu ]; then
        rm -rf "$env"
        bash "$here/theano-gpu.sh" "$prefix"
    else
        if ! "$theano_python" -c 'import sys; assert sys.version_info[:2] == (3, 7)' 2>/dev/null; then
            echo "provision.sh: the theano environment needs Python 3.7; '$theano_python' is not one." >&2
            echo "  Install it (pyenv install 3.7.16) and pass --theano-python or set CLOUDTRAIN_PYTHON37." >&2
            exit 3
        fi
        new_venv theano "$theano_python" lock-theano.txt
    fi
    # Theano compiles C for each new graph (~30 s for a first fit): compile the common
    # ones now, into PREFIX/theano-cache, which every instance starts from a copy of.
    step "theano: warming the compile cache"
    rm -rf "$prefix/theano-cache"
    KERAS_BACKEND=theano THEANO_FLAGS="device=cpu,floatX=float32,base_compiledir=$prefix/theano-cache" \
        HOME="$prefix" "$env/bin/python" "$here/warm_theano.py"
    rm -rf "$prefix/.keras"
}

IFS=',' read -r -a wanted <<<"$envs"
for name in "${wanted[@]}"; do
    case "$name" in tensorflow|theano) ;; *) echo "provision.sh: unknown environment '$name'" >&2; exit 2 ;; esac
done
# The number of [provision] lines to come, for the controller's progress bar (the last is
# "done"): an environment already built is one; building one is three (the GPU theano
# one four when Miniforge is to be installed first).
steps=1
for name in "${wanted[@]}"; do
    if [ -f "$prefix/envs/$name/.complete" ]; then
        steps=$((steps + 1))
    elif [ "$name" = theano ] && [ "$flavor" = gpu ] && [ ! -x "$prefix/conda/bin/conda" ]; then
        steps=$((steps + 4))
    else
        steps=$((steps + 3))
    fi
done
printf '[provision] steps: %d\n' "$steps"
for name in "${wanted[@]}"; do
    if [ -f "$prefix/envs/$name/.complete" ]; then
        step "$name: already built"
        continue
    fi
    "build_$name"
    touch "$prefix/envs/$name/.complete"
done

# Every complete environment, for the controller and `cloudtrain doctor`.
"$prefix/envs/${wanted[0]}/bin/python" - "$prefix" "$flavor" <<'PY'
import json, os, subprocess, sys
prefix, flavor = sys.argv[1], sys.argv[2]
envs = {}
for name in sorted(os.listdir(os.path.join(prefix, "envs"))):
    if not os.path.isfile(os.path.join(prefix, "envs", name, ".complete")):
        continue
    py = os.path.join(prefix, "envs", name, "bin", "python")
    version = subprocess.run([py, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.strip()
    envs[name] = {"python": py, "python_version": version}
cache = os.path.join(prefix, "theano-cache")
tmp = os.path.join(prefix, "image.json.tmp")
with open(tmp, "w") as out:
    json.dump({"schema": 1, "flavor": flavor, "envs": envs,
               "theano_cache": cache if os.path.isdir(cache) else None}, out, indent=2)
os.replace(tmp, os.path.join(prefix, "image.json"))
PY
step "done: $prefix"
