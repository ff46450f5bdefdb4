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
# whose input changed after it was written. The tensorflow locks name their Pythons in a
# `# pythons:` line, which provision.sh and the simulated image check.
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
new="$work/new"  # the locks, moved into ami/ together once all are written and checked
mkdir "$new"

sha256() { python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
pins() { grep -o '^[a-z0-9][^ ;]*' "$1"; }  # LOCK: its name==version lines

# The input with `tensorflow==` given its wheel: tensorflow[and-cuda] or tensorflow-cpu.
with_wheel() {  # WHEEL: requirements-tensorflow.txt, its tensorflow line naming WHEEL
    grep -q '^tensorflow==' "$here/requirements-tensorflow.txt" ||
        { echo "lock.sh: requirements-tensorflow.txt has no 'tensorflow==' line" >&2; exit 2; }
    sed "s/^tensorflow==/$1==/" "$here/requirements-tensorflow.txt"
}

# uv's output into $new/LOCK, behind a line naming its input (and the input's sha256) and,
# with PYTHONS, a line naming the Pythons it is for (provision.sh refuses any other).
compile() {  # LOCK INPUT-NAME INPUT-PATH PYTHONS UV-INPUT UV-ARGS...
    local lock="$1" name="$2" input="$3" pythons="$4" source="$5"; shift 5
    # uv takes the pins already in -o as preferences: the current lock's, unless --upgrade.
    if [ -f "$here/$lock" ]; then grep -v '^# cloudtrain\|^# pythons' "$here/$lock" >"$work/out.txt"; fi
    (cd "$work" && uv pip compile "$source" --quiet --generate-hashes --no-annotate \
        --custom-compile-command "tox -e lock" -o "$work/out.txt" ${upgrade[@]+"${upgrade[@]}"} "$@")
    {
        printf '# cloudtrain lock of %s sha256=%s\n' "$name" "$(sha256 "$input")"
        if [ -n "$pythons" ]; then printf '# pythons: %s\n' "$pythons"; fi
        cat "$work/out.txt"
    } >"$new/$lock"
    rm -f "$work/out.txt"
    echo "lock.sh: $lock: $(pins "$new/$lock" | wc -l | tr -d ' ') packages"
}

with_wheel 'tensorflow[and-cuda]' >"$work/tensorflow-gpu.in"
compile lock-tensorflow-gpu.txt requirements-tensorflow.txt "$here/requirements-tensorflow.txt" \
    "$GPU_PYTHON" tensorflow-gpu.in --python-version "$GPU_PYTHON" --python-platform "$PLATFORM"
tf="$(pins "$new/lock-tensorflow-gpu.txt" | sed -n 's/^tensorflow==//p')"

# The CPU lock: the GPU lock's versions, tensorflow-cpu of its TensorFlow version.
with_wheel tensorflow-cpu >"$work/tensorflow-cpu.in"
{ grep -v '^#' "$new/lock-tensorflow-gpu.txt"; echo "tensorflow-cpu==$tf"; } >"$work/gpu-constraints.txt"
first="${CPU_PYTHONS%% *}"
compile lock-tensorflow-cpu.txt requirements-tensorflow.txt "$here/requirements-tensorflow.txt" \
    "$CPU_PYTHONS" tensorflow-cpu.in -c gpu-constraints.txt --python-version "$first" --python-platform "$PLATFORM"
for py in ${CPU_PYTHONS#"$first"}; do
    (cd "$work" && uv pip compile tensorflow-cpu.in --quiet --no-header --no-annotate \
        -c gpu-constraints.txt --python-version "$py" --python-platform "$PLATFORM") >"$work/$py.txt"
    if ! diff <(pins "$new/lock-tensorflow-cpu.txt") <(pins "$work/$py.txt") >&2; then
        echo "lock.sh: on Python $py the CPU environment resolves to other pins (above):" \
            "one lock cannot serve $CPU_PYTHONS" >&2
        exit 1
    fi
done

echo "tf-keras==$(echo "$tf" | cut -d. -f1,2).*" >"$work/tf-keras.in"
compile lock-tf-keras.txt lock-tensorflow-gpu.txt "$new/lock-tensorflow-gpu.txt" "" \
    tf-keras.in --no-deps --python-version "$GPU_PYTHON" --python-platform "$PLATFORM"

cp "$here/requirements-theano.txt" "$work/theano.in"
compile lock-theano.txt requirements-theano.txt "$here/requirements-theano.txt" "" \
    theano.in --python-version 3.7 --python-platform "$PLATFORM"

mv "$new"/lock-*.txt "$here/"
