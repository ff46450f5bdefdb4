"""The simulated image: the job environments dry-run instances run in, built by ami/provision.sh.

Built once per machine into the user cache folder (platformdirs), keyed by the
recipe's hash, and shared by every CLOUDTRAIN_HOME, so the test suite and repeated
dry-runs do not reinstall TensorFlow. Environments are added as jobs need them: the
theano one (Python 3.7, found by ``find_python37``) only for a theano job. Each
simulated instance gets its own writable layer over it (see ``simulator.make_layer``);
nothing writes into the cache after the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cloudtrain.errors import CloudError, InputError
from cloudtrain.progress import Reporter

# What the simulated image is built from. The locks, not the requirements they are written
# from, say what is installed (lock.sh writes them; the tests refuse a stale one).
LOCK_FILES = ("lock-tensorflow-cpu.txt", "lock-tensorflow-gpu.txt", "lock-tf-keras.txt", "lock-theano.txt")
RECIPE_FILES = ("provision.sh", *LOCK_FILES, "warm_theano.py")
ENVS = ("tensorflow", "theano")
INSTALL_PYTHON37 = (
    "Install it (`pyenv install 3.7.16`, or your distribution's python3.7) or set "
    "CLOUDTRAIN_PYTHON37 to its path; the tensorflow backend works without it."
)


class RecipeSteps:
    """The image recipe's progress, from its output: provision.sh first writes
    ``[provision] steps: N``, then a ``[provision]`` line as each step starts (the last is
    ``done: PREFIX``). Each step becomes an info line (``LABEL: STEP``) and the step count
    a progress bar named ``what``."""

    MARK = "[provision] "

    def __init__(self, reporter: Reporter, what: str, label: str) -> None:
        self.reporter, self.what, self.label = reporter, what, label
        self.started = 0
        self.total: int | None = None

    def line(self, line: str) -> bool:
        """Report a ``[provision]`` line and say True; other lines are the caller's."""
        if not line.startswith(self.MARK):
            return False
        text = line.removeprefix(self.MARK)
        if text.startswith("steps: ") and text[7:].isdigit() and self.total is None:
            self.total = int(text[7:])
        else:
            self.started += 1
            self.reporter.info(f"{self.label}: {text}")
        if self.total is None or self.started <= self.total:
            self.reporter.steps(self.what, max(0, self.started - 1), self.total)
        return True

    def finished(self) -> None:
        """The recipe succeeded: the bar is full, and ends."""
        total = max(self.total or 0, self.started)
        self.reporter.steps(self.what, total, total)


def recipe_dir() -> Path:
    return Path(str(importlib.resources.files("cloudtrain.ami")))


def image_python() -> str:
    """The Python the tensorflow environment is built from: CLOUDTRAIN_IMAGE_PYTHON, else ours."""
    return os.environ.get("CLOUDTRAIN_IMAGE_PYTHON") or sys.executable


def python_version(python: str) -> str:
    """``python``'s version (``3.11.7``), by running it; OSError or SubprocessError if it fails."""
    reply = subprocess.run(
        [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if reply.returncode != 0:
        raise OSError(f"exit {reply.returncode}: {(reply.stderr or reply.stdout).strip()[-200:]}")
    return reply.stdout.strip()


def _is_python37(candidate: str) -> bool:
    try:
        return python_version(candidate).startswith("3.7.")
    except (OSError, subprocess.SubprocessError):
        return False


def python37_candidates() -> list[str]:
    """Where a Python 3.7 may be: $CLOUDTRAIN_PYTHON37, pyenv's versions, python3.7 on PATH."""
    found = []
    if os.environ.get("CLOUDTRAIN_PYTHON37"):
        found.append(os.environ["CLOUDTRAIN_PYTHON37"])
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            answer = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=10)
            roots.insert(0, answer.stdout)
    for root in dict.fromkeys(r.strip() for r in roots if r.strip()):
        found += [str(p) for p in sorted(Path(root, "versions").glob("3.7*/bin/python3.7"), reverse=True)]
    on_path = shutil.which("python3.7")
    if on_path:
        found.append(on_path)
    return found


def find_python37() -> str | None:
    """A working Python 3.7 for the theano environment, or None. Each candidate is run:
    pyenv's bare ``python3.7`` shim exists but exits 127 unless pyenv selects 3.7."""
    for candidate in python37_candidates():
        if _is_python37(candidate):
            return candidate
    return None


def locked_pythons() -> list[str]:
    """The Pythons the simulated image's tensorflow lock resolves the same on (lock.sh checks
    each and writes them in its ``# pythons:`` line): the TensorFlow wheel has no other."""
    for line in (recipe_dir() / "lock-tensorflow-cpu.txt").read_text().splitlines():
        if line.startswith("# pythons: "):
            return line.removeprefix("# pythons: ").split()
    raise CloudError(
        "ami/lock-tensorflow-cpu.txt has no '# pythons:' line", hint="Write it again (tox -e lock)."
    )


def check_image_python() -> None:
    """Raise InputError unless the tensorflow environment's Python is one the lock is for."""
    python = image_python()
    try:
        version = ".".join(python_version(python).split(".")[:2])
    except (OSError, subprocess.SubprocessError) as error:
        raise InputError(f"cannot run {python} to build the simulated image: {error}") from error
    pythons = locked_pythons()
    if version not in pythons:
        raise InputError(
            f"the simulated image's TensorFlow is locked for Python {', '.join(pythons)}; "
            f"{python} is Python {version}",
            hint=f"Set CLOUDTRAIN_IMAGE_PYTHON to a Python {' or '.join(pythons)}, "
            "or install cloudtrain with one.",
        )


def recipe_hash() -> str:
    """What the image is built from: the recipe files, the flavor, the tensorflow env's Python.

    The environments are not part of it: they are added to one image as jobs need them."""
    digest = hashlib.sha256()
    for name in RECIPE_FILES:
        digest.update(name.encode() + b"\0" + (recipe_dir() / name).read_bytes() + b"\0")
    # The interpreter the venv is really made from: a venv's python, python3 and python3.11
    # (or tox's) are one Python, and must share one image.
    base = subprocess.run(
        [image_python(), "-c", "import sys; print(sys.version, sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    digest.update(f"cpu|{base}".encode())
    return digest.hexdigest()[:16]


# The whole recipe of the real (GPU) image: what a built image's version is the hash of.
IMAGE_RECIPE_FILES = (*RECIPE_FILES, "theano-gpu.sh", "theano-gpus.json")


def recipe_version() -> str:
    """The image recipe's version: a hash of the ami/ files alone (no flavor, no local Python),
    so an image built on AWS and the simulated one carry the same version for one recipe.
    ``cloudtrain image build`` tags images with it; a run's default image is the newest of it."""
    digest = hashlib.sha256()
    for name in IMAGE_RECIPE_FILES:
        digest.update(name.encode() + b"\0" + (recipe_dir() / name).read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    override = os.environ.get("CLOUDTRAIN_CACHE")
    if override:
        return Path(override).expanduser().absolute()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cloudtrain"))


def image_path() -> Path:
    return cache_root() / "images" / f"sim-{recipe_hash()}"


def is_built(path: Path, envs: tuple[str, ...] = ("tensorflow",)) -> bool:
    return (path / "image.json").is_file() and all((path / "envs" / e / ".complete").is_file() for e in envs)


def ensure_image(envs: tuple[str, ...] = ("tensorflow",), reporter: Reporter | None = None) -> Path:
    """Build what the simulated image lacks of ``envs`` (cached per recipe); return its prefix.
    ``reporter`` hears the recipe's steps (``simulated image: ...``) and their count.

    The theano environment needs a Python 3.7 (``find_python37``); without one this
    raises InputError saying what to install, before building anything."""
    from filelock import FileLock

    unknown = [e for e in envs if e not in ENVS]
    if unknown:
        raise InputError(f"no job environment {', '.join(unknown)}", hint=f"Use one of: {', '.join(ENVS)}.")
    if "tensorflow" in envs:  # before image_path, which runs it too, with a rawer error
        check_image_python()
    path = image_path()
    if is_built(path, envs):
        return path
    python37 = None
    if "theano" in envs:
        python37 = find_python37()
        if python37 is None:
            tried = ", ".join(python37_candidates()) or "none found"
            raise InputError(
                f"the theano backend's simulated image needs Python 3.7; none works here (tried: {tried})",
                hint=INSTALL_PYTHON37,
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if is_built(path, envs):
            return path
        command = ["bash", str(recipe_dir() / "provision.sh"), "--prefix", str(path), "--flavor", "cpu"]
        command += ["--envs", ",".join(envs), "--python", image_python()]
        if python37:
            command += ["--theano-python", python37]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=path.parent,  # never the user's folder: the recipe's Pythons import nothing from it
            text=True,
        )
        assert process.stdout is not None
        tail: list[str] = []
        steps = RecipeSteps(reporter or Reporter(), "building the simulated image", "simulated image")
        try:
            for line in process.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-30:]
                steps.line(line)
        except BaseException:  # Ctrl-C or SIGTERM: the build stops with us, half-built stays unmarked
            process.terminate()
            process.wait()
            raise
        if process.wait() != 0:
            raise CloudError(
                "building the simulated image failed:\n" + "\n".join(tail),
                hint="Check the network access to PyPI and free disk space, then run again.",
            )
        steps.finished()
    return path


def describe(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((path / "image.json").read_text())
    return data
