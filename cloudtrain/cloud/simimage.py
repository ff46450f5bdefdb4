"""The simulated image: the job environments dry-run instances run in, built by ami/provision.sh.

Built once per machine into the user cache folder (platformdirs), keyed by the
recipe's hash, and shared by every CLOUDTRAIN_HOME, so the test suite and repeated
dry-runs do not reinstall TensorFlow. Each simulated instance gets its own writable
layer over it (see ``simulator.make_layer``); nothing writes into the cache after
the build.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cloudtrain.errors import CloudError

RECIPE_FILES = ("provision.sh", "requirements-tensorflow.txt")


def recipe_dir() -> Path:
    return Path(str(importlib.resources.files("cloudtrain.ami")))


def image_python() -> str:
    """The Python the tensorflow environment is built from: CLOUDTRAIN_IMAGE_PYTHON, else ours."""
    return os.environ.get("CLOUDTRAIN_IMAGE_PYTHON") or sys.executable


def recipe_hash(envs: tuple[str, ...] = ("tensorflow",)) -> str:
    """What the image is built from: the recipe files, the environments, the flavor, the Python."""
    digest = hashlib.sha256()
    for name in RECIPE_FILES:
        digest.update(name.encode() + b"\0" + (recipe_dir() / name).read_bytes() + b"\0")
    version = subprocess.run(
        [image_python(), "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True
    ).stdout
    digest.update(f"cpu|{','.join(envs)}|{image_python()}|{version}".encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    override = os.environ.get("CLOUDTRAIN_CACHE")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cloudtrain"))


def image_path(envs: tuple[str, ...] = ("tensorflow",)) -> Path:
    return cache_root() / "images" / f"sim-{recipe_hash(envs)}"


def is_built(path: Path) -> bool:
    return (path / "image.json").is_file()


def ensure_image(
    envs: tuple[str, ...] = ("tensorflow",), progress: Callable[[str], None] | None = None
) -> Path:
    """Build the simulated image unless this recipe's build is cached; return its prefix."""
    from filelock import FileLock

    path = image_path(envs)
    if is_built(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if is_built(path):
            return path
        command = ["bash", str(recipe_dir() / "provision.sh"), "--prefix", str(path), "--flavor", "cpu"]
        command += ["--envs", ",".join(envs), "--python", image_python()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert process.stdout is not None
        tail: list[str] = []
        try:
            for line in process.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-30:]
                if progress and line.startswith("[provision]"):
                    progress(line.removeprefix("[provision] "))
        except BaseException:  # Ctrl-C or SIGTERM: the build stops with us, half-built stays unmarked
            process.terminate()
            process.wait()
            raise
        if process.wait() != 0:
            raise CloudError(
                "building the simulated image failed:\n" + "\n".join(tail),
                hint="Check the network access to PyPI and free disk space, then run again.",
            )
    return path


def describe(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((path / "image.json").read_text())
    return data
