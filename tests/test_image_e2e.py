"""`cloudtrain image build --dry-run` end to end: a simulated builder over real SSH runs the
recipe, create_image registers the image in the simulated AWS, and a following
`run --dry-run` starts from it; a failed or interrupted build leaves no builder."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_run_e2e import CLOUDTRAIN, cloudtrain, only_run, py, sim_image, status, write_job  # noqa: F401  (fixture)

from cloudtrain import bringup
from cloudtrain.api import build_image
from cloudtrain.cloud.aws import TAG_RUN_ID, AwsCloud
from cloudtrain.cloud.simimage import recipe_version
from cloudtrain.cloud.simulator import ensure_simulator
from cloudtrain.errors import RemoteError
from cloudtrain.ledger import Ledger
from cloudtrain.settings import Settings


def instances(settings: Settings, region: str = "us-east-1") -> list[dict[str, Any]]:
    cloud = AwsCloud(ensure_simulator(settings), region)
    return [i for r in cloud.ec2.describe_instances()["Reservations"] for i in r["Instances"]]


def live(settings: Settings) -> list[str]:
    return [i["InstanceId"] for i in instances(settings) if i["State"]["Name"] != "terminated"]


def images_of(settings: Settings, run_id: str) -> list[str]:
    cloud = AwsCloud(ensure_simulator(settings), "us-east-1")
    found = cloud.ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{TAG_RUN_ID}", "Values": [run_id]}]
    )
    return [i["ImageId"] for i in found["Images"]]


def as_json(*args: str) -> Any:
    return json.loads(cloudtrain(*args, "--json", check=True).stdout)


def test_build_list_copy_run_and_remove(sim_image: Path, tmp_path: Path, settings: Settings) -> None:
    built = as_json("image", "build", "--dry-run", "--backends", "tensorflow")
    image, version = built["image"], built["version"]
    assert version == recipe_version() and built["simulated"]
    assert built["backends"]["tensorflow"]["backend"] == "tensorflow"
    # the base was found by name and owner (the newest x86_64 Deep Learning Base image)
    assert built["base_image"] == "ami-0d1b5a8c13042a102"
    assert live(settings) == []  # the builder is gone
    builder = next(i for i in instances(settings) if i["InstanceId"] == built["builder"])
    assert builder["State"]["Name"] == "terminated" and "InstanceLifecycle" not in builder  # on-demand
    assert status(built["run_id"])["state"] == "succeeded"

    listed = as_json("image", "list", "--dry-run")
    assert listed["default"] == image and listed["recipe_version"] == version
    # the built image, and the simulator's own (of the installed recipe: `run` needs no build)
    assert {i["name"]: i["current"] for i in listed["images"]} == {
        built["name"]: True,
        "cloudtrain-gpu-simulated": True,
    }
    # what the build verified, as the image's tag (run.json's backend_report says it per run)
    report = built["backends"]["tensorflow"]
    frameworks = {i["name"]: i["frameworks"] for i in listed["images"]}
    assert frameworks[built["name"]] == (
        f"tensorflow: Keras {report['keras_version']}, tensorflow {report['framework_version']}"
    )

    copy = as_json("image", "copy", image, "--to", "us-west-2", "--dry-run")["copy"]
    assert (copy["region"], copy["name"], copy["version"]) == ("us-west-2", built["name"], version)
    west = as_json("image", "list", "--dry-run", "--region", "us-west-2")
    assert west["default"] == copy["id"]

    # a following run finds the built image by the lookup a real run uses
    job = write_job(tmp_path / "job", py("print('trained')"))
    cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"), check=True)
    run_id = only_run(tmp_path / "runs").name
    ran = [i for i in instances(settings) if any(t["Value"] == run_id for t in i.get("Tags", []))]
    assert [i["ImageId"] for i in ran] == [image]

    removed = as_json("image", "rm", image, "--dry-run")["removed"]
    assert removed["id"] == image
    assert image not in [i["id"] for i in as_json("image", "list", "--dry-run")["images"]]

    # resources.image: base: the base image, the job environment installed at boot
    base_job = tmp_path / "base" / "job.yaml"
    base_job.parent.mkdir()
    base_job.write_text(f"name: on-base\nrun: {py('print(1)')!r}\nresources: {{gpu: T4, image: base}}\n")
    done = cloudtrain("run", str(base_job), "--dry-run", "--out", str(tmp_path / "base-runs"), check=True)
    assert "recipe: tensorflow: already built" in done.stderr, done.stderr
    base_run = only_run(tmp_path / "base-runs").name
    ran = [i for i in instances(settings) if any(t["Value"] == base_run for t in i.get("Tags", []))]
    assert [i["ImageId"] for i in ran] == [built["base_image"]]

    report = json.loads(cloudtrain("cost-report", "--format", "json", check=True).stdout)
    rows = report["rows"] if isinstance(report, dict) else report
    assert any(r["key"] == built["run_id"] and r["name"] == "image-build" for r in rows), report


def test_failed_recipe_leaves_no_builder(
    sim_image: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        bringup,
        "provision_command",
        lambda envs, gpu: "echo '[provision] tensorflow: installing'; echo boom; exit 7",
    )
    with pytest.raises(RemoteError, match=r"(?s)the image recipe failed .* \(exit code 7\):\n.*boom"):
        build_image(settings, dry_run=True, envs=("tensorflow",))
    assert live(settings) == []
    with Ledger.open(ensure_simulator(settings)) as ledger:
        (run,) = ledger.list_runs()
        assert run.name == "image-build" and run.state.value == "failed"
        assert all(i.terminated_at for i in ledger.instances(run.id))
    assert images_of(settings, run.id) == []


def test_ctrl_c_during_the_build_leaves_no_builder(sim_image: Path, settings: Settings) -> None:
    process = subprocess.Popen(
        [CLOUDTRAIN, "image", "build", "--dry-run", "--backends", "tensorflow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert process.stderr is not None
    seen, deadline = [], time.monotonic() + 300
    for line in process.stderr:
        seen.append(line)
        if "▸ provisioning" in line:
            process.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(seen)
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 130, "".join(seen) + rest
    assert "terminating the builder" in rest
    assert live(settings) == []
    with Ledger.open(ensure_simulator(settings)) as ledger:
        (run,) = ledger.list_runs()
        assert run.state.value == "cancelled"
    assert images_of(settings, run.id) == []
