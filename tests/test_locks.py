"""The image recipe's lock files (ami/lock-*.txt): current, complete, hashed, consistent.

lock.sh writes them with uv (which needs PyPI, so it never runs here); these tests read
them as pip will and fail on a lock its input has outgrown, a pin without a hash, or a
simulated image whose packages differ from the real image's."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_image import STUB_PYTHON

from cloudtrain.cloud import simimage
from cloudtrain.errors import InputError

AMI = Path(__file__).resolve().parent.parent / "ami"
STAMP = re.compile(r"# cloudtrain lock of (\S+) sha256=([0-9a-f]{64})$")


def entries(lock: str) -> dict[str, tuple[str, list[str]]]:
    """A lock as pip reads it: each requirement (continuation lines joined) by its name:
    (the pinned version, its hashes). A line that is no `name==version` fails the test."""
    text = (AMI / lock).read_text()
    found: dict[str, tuple[str, list[str]]] = {}
    for logical in text.replace("\\\n", " ").splitlines():
        logical = logical.split(" #", 1)[0].strip()
        if not logical or logical.startswith("#"):
            continue
        words = logical.split()
        requirement = Requirement(words[0])
        pins = [s for s in requirement.specifier if s.operator == "=="]
        assert len(pins) == 1 and len(requirement.specifier) == 1, f"{lock}: {words[0]} is not pinned"
        hashes = [w.removeprefix("--hash=") for w in words[1:]]
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{lock}: {logical}"
        found[canonicalize_name(requirement.name)] = (pins[0].version, hashes)
    return found


@pytest.mark.parametrize("lock", simimage.LOCK_FILES)
def test_each_lock_pins_every_package_with_its_hashes(lock: str) -> None:
    locked = entries(lock)
    assert locked, f"{lock} pins nothing"
    for name, (_, hashes) in locked.items():
        assert hashes, f"{lock}: {name} has no --hash: pip --require-hashes refuses the whole lock"


@pytest.mark.parametrize("lock", simimage.LOCK_FILES)
def test_each_lock_is_as_new_as_its_input(lock: str) -> None:
    stamp = STAMP.match((AMI / lock).read_text().splitlines()[0])
    assert stamp, f"{lock}'s first line does not name its input"
    source, digest = stamp.groups()
    assert hashlib.sha256((AMI / source).read_bytes()).hexdigest() == digest, (
        f"ami/{source} changed after ami/{lock} was written: run `tox -e lock`"
    )


def hand_written(requirements: str) -> list[Requirement]:
    lines = (AMI / requirements).read_text().splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


@pytest.mark.parametrize(
    ("requirements", "lock", "tensorflow"),
    [
        ("requirements-tensorflow.txt", "lock-tensorflow-gpu.txt", "tensorflow"),
        ("requirements-tensorflow.txt", "lock-tensorflow-cpu.txt", "tensorflow-cpu"),
        ("requirements-theano.txt", "lock-theano.txt", None),
    ],
)
def test_each_lock_satisfies_the_requirements_it_was_written_from(
    requirements: str, lock: str, tensorflow: str | None
) -> None:
    locked = entries(lock)
    for wanted in hand_written(requirements):
        name = tensorflow if wanted.name == "tensorflow" else canonicalize_name(wanted.name)
        assert name in locked, f"{lock} lacks {name}, which {requirements} asks for"
        version = locked[name][0]
        assert wanted.specifier.contains(version, prereleases=True), (
            f"{lock}: {name}=={version} is not {wanted}"
        )


def test_the_simulated_image_holds_the_real_images_versions() -> None:
    gpu, cpu = entries("lock-tensorflow-gpu.txt"), entries("lock-tensorflow-cpu.txt")
    assert cpu["tensorflow-cpu"][0] == gpu["tensorflow"][0]
    shared = set(gpu) & set(cpu)
    assert {"keras", "numpy", "h5py", "boto3"} <= shared
    assert {name: cpu[name][0] for name in shared} == {name: gpu[name][0] for name in shared}
    assert not {name for name in cpu if name not in gpu and name != "tensorflow-cpu"}


def test_tf_keras_is_of_tensorflows_minor_version() -> None:
    (name, (version, _)), *more = entries("lock-tf-keras.txt").items()
    tensorflow = entries("lock-tensorflow-gpu.txt")["tensorflow"][0]
    assert name == "tf-keras" and not more
    assert version.split(".")[:2] == tensorflow.split(".")[:2]


def test_a_changed_lock_is_a_new_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    recipe = tmp_path / "ami"
    recipe.mkdir()
    for path in AMI.iterdir():
        if path.is_file():
            (recipe / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(simimage, "recipe_dir", lambda: recipe)
    before = (simimage.recipe_version(), simimage.recipe_hash())
    for lock in simimage.LOCK_FILES:
        with (recipe / lock).open("a") as out:
            out.write("# touched\n")
        after = (simimage.recipe_version(), simimage.recipe_hash())
        assert after[0] != before[0] and after[1] != before[1], lock
        before = after


def stub_python(folder: Path, version: str = "3.10.12") -> Path:
    """test_image's stub interpreter, claiming to be Python ``version``."""
    stub = folder / "python"
    stub.write_text(STUB_PYTHON.replace("3.10.12", version))
    stub.chmod(0o755)
    return stub


def test_the_simulated_image_refuses_a_python_its_lock_is_not_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert "3.14" not in simimage.locked_pythons()
    monkeypatch.setenv("CLOUDTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLOUDTRAIN_IMAGE_PYTHON", str(stub_python(tmp_path, "3.14.0")))
    with pytest.raises(
        InputError, match=r"locked for Python 3\.10, .*, 3\.13; .* is Python 3\.14"
    ) as refused:
        simimage.ensure_image(("tensorflow",))
    assert "CLOUDTRAIN_IMAGE_PYTHON" in (refused.value.hint or "")
    assert not (tmp_path / "cache").exists()  # nothing built, nothing begun


def provision(tmp_path: Path, flavor: str, python: Path) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(AMI / "provision.sh"), "--prefix", str(tmp_path / "image"), "--flavor", flavor]
    env = {**os.environ, "PIP_LOG": str(tmp_path / "pip.log")}
    return subprocess.run([*command, "--python", str(python)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("flavor", ["cpu", "gpu"])
def test_the_recipe_installs_the_locks_alone_hashes_checked(tmp_path: Path, flavor: str) -> None:
    done = provision(tmp_path, flavor, stub_python(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    expected = [f"lock-tensorflow-{flavor}.txt", "lock-tf-keras.txt"]
    assert (tmp_path / "pip.log").read_text().splitlines() == [
        f"-m pip install --quiet --progress-bar off --require-hashes --no-deps -r {AMI}/{lock}"
        for lock in expected
    ]


@pytest.mark.parametrize(("flavor", "version"), [("cpu", "3.14.0"), ("gpu", "3.12.3")])
def test_the_recipe_refuses_a_python_the_lock_is_not_for(tmp_path: Path, flavor: str, version: str) -> None:
    done = provision(tmp_path, flavor, stub_python(tmp_path, version))
    assert done.returncode == 3
    short = version.rsplit(".", 1)[0]
    assert (
        f"lock-tensorflow-{flavor}.txt is for Python 3.10" in done.stderr
        and f"is Python {short}" in done.stderr
    )
    assert not (tmp_path / "pip.log").exists()  # nothing installed


def test_the_gpu_theano_environment_installs_the_theano_lock() -> None:
    script = (AMI / "theano-gpu.sh").read_text()
    installs = [line for line in script.splitlines() if "pip install" in line]
    assert installs and all(
        '--require-hashes --no-deps -r "$here/lock-theano.txt"' in line for line in installs
    )
