#!/usr/bin/env bash
# Lock the image recipe's job environments: every package pinned, with the sha256 of each
# of its files, so two builds of one recipe version install the same bytes. Run through
# `tox -e lock` (which installs the uv this needs); `--upgrade` moves every pin to the
# newest the requirements allow (otherwise the current pins are kept where they still fit).
#
#   lock.sh [--upgrade]
#
# From the hand-edited requirements-tensorflow.txt and requirements-theano.txt it writes:
#   lock-tensorflow-gpu.txt  tensorflow[and-cuda] and the rest, for the GPU image's python3
#                            (the Deep Learning Base image: Ubuntu 22.04, Python 3.10, x86_64)
#   lock-tensorflow-cpu.txt  tensorflow-cpu and the rest for the simulated image, held to the
#                            GPU lock's versions, and checked to resolve to the same pins on
#                            every Python in CPU_PYTHONS (those a dry-run may build it with)
#   lock-tf-keras.txt        tf-keras of TensorFlow's minor version, alone: it is installed
#                            --no-deps, since it names the tensorflow wheel
#   lock-theano.txt          the theano environment, for Python 3.7
# Each lock's first line names its input and the input's sha256: the tests refuse a lock
# whose input changed after it was written.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
CPU_PYTHONS="3.10 3.11 3.12 3.13"
GPU_PYTHON="3.10"
PLATFORM="x86_64-manylinux_2_28"

upgrade=()
case "${1:-}" in
    "") ;;
    --upgrade) upgrade=(--upgrade) ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
command -v uv >/dev/null || { echo "lock.sh: needs uv: run it as \`tox -e lock\`" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The input with `tensorflow==` given its wheel: tensorflow[and-cuda] or tensorflow-cpu.
with_wheel() {  # WHEEL: requirements-tensorflow.txt, its tensorflow line naming WHEEL
    grep -q '^tensorflow==' "$here/requirements-tensorflow.txt" ||
        { echo "lock.sh: requirements-tensorflow.txt has no 'tensorflow==' line" >&2; exit 2; }
    sed "s/^tensorflow==/$1==/" "$here/requirements-tensorflow.txt"
}

# uv's output, behind a first line naming the input and its sha256.
compile() {  # LOCK INPUT-NAME INPUT-FILE UV-ARGS...: write ami/LOCK
    local lock="$1" name="$2" input="$3"; shift 3
    (cd "$work" && uv pip compile "$input" --quiet --generate-hashes --no-annotate \
        --custom-compile-command "tox -e lock" -o "$work/out.txt" "${upgrade[@]}" "$@")
    { printf '# cloudtrain lock of %s sha256=%s\n' "$name" \
        "$(sha256sum "$here/$name" | cut -d' ' -f1)"; cat "$work/out.txt"; } >"$here/$lock"
    rm -f "$work/out.txt"
    echo "lock.sh: $lock: $(grep -c '^[a-z0-9]' "$here/$lock") packages"
}
pins() { grep -o '^[a-z0-9][^ ;]*' "$1"; }  # LOCK: its name==version lines
preferring() {  # LOCK: uv reads the pins in -o as preferences: start from the current lock
    if [ -f "$here/$1" ]; then sed 1d "$here/$1" >"$work/out.txt"; fi
}

with_wheel 'tensorflow[and-cuda]' >"$work/tensorflow-gpu.in"
preferring lock-tensorflow-gpu.txt
compile lock-tensorflow-gpu.txt requirements-tensorflow.txt tensorflow-gpu.in \
    --python-version "$GPU_PYTHON" --python-platform "$PLATFORM"

with_wheel tensorflow-cpu >"$work/tensorflow-cpu.in"
sed 1d "$here/lock-tensorflow-gpu.txt" >"$work/gpu-constraints.txt"
first="${CPU_PYTHONS%% *}"
preferring lock-tensorflow-cpu.txt
compile lock-tensorflow-cpu.txt requirements-tensorflow.txt tensorflow-cpu.in \
    -c gpu-constraints.txt --python-version "$first" --python-platform "$PLATFORM"
sed -i "1a # pythons: $CPU_PYTHONS" "$here/lock-tensorflow-cpu.txt"
for py in ${CPU_PYTHONS#"$first"}; do
    (cd "$work" && uv pip compile tensorflow-cpu.in --quiet --no-header --no-annotate \
        -c gpu-constraints.txt --python-version "$py" --python-platform "$PLATFORM") >"$work/$py.txt"
    if ! diff <(pins "$here/lock-tensorflow-cpu.txt") <(pins "$work/$py.txt") >&2; then
        echo "lock.sh: on Python $py the CPU environment resolves to other pins (above):" \
            "one lock cannot serve $CPU_PYTHONS" >&2
        exit 1
    fi
done

tf="$(pins "$here/lock-tensorflow-gpu.txt" | sed -n 's/^tensorflow==//p')"
cpu_tf="$(pins "$here/lock-tensorflow-cpu.txt" | sed -n 's/^tensorflow-cpu==//p')"
[ "$tf" = "$cpu_tf" ] || { echo "lock.sh: tensorflow $tf (GPU) but tensorflow-cpu $cpu_tf" >&2; exit 1; }
minor="$(echo "$tf" | cut -d. -f1,2)"
echo "tf-keras==$minor.*" >"$work/tf-keras.in"
preferring lock-tf-keras.txt
compile lock-tf-keras.txt lock-tensorflow-gpu.txt tf-keras.in \
    --no-deps --python-version "$GPU_PYTHON" --python-platform "$PLATFORM"

cp "$here/requirements-theano.txt" "$work/theano.in"
preferring lock-theano.txt
compile lock-theano.txt requirements-theano.txt theano.in \
    --python-version 3.7 --python-platform "$PLATFORM"
