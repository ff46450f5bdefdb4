"""`cloudtrain doctor --launch --dry-run`: a run's control path on a small spot instance,
no training, against the simulator: every phase, the cost recorded, nothing left; a
failing phase still removes everything; nothing is launched without consent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_run_e2e import CLOUDTRAIN, live_instances, status

from cloudtrain import smoketest
from cloudtrain.api import launch_smoke_test
from cloudtrain.cloud.aws import AwsCloud
from cloudtrain.cloud.simulator import ensure_simulator
from cloudtrain.errors import RemoteError
from cloudtrain.ledger import Ledger
from cloudtrain.settings import Settings

PHASES = [
    "image",
    "key pair",
    "security group",
    "launch",
    "running",
    "host key",
    "ssh",
    "agent",
    "command",
    "teardown",
    "nothing left",
]


def test_every_phase_passes_costs_cents_and_leaves_nothing(settings: Settings) -> None:
    done = subprocess.run(
        [CLOUDTRAIN, "doctor", "--launch", "--dry-run", "--json"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [p["phase"] for p in result["phases"]] == PHASES
    assert all(p["seconds"] >= 0 for p in result["phases"])
    assert result["instance_type"] == "t3.micro" and result["left"] == []
    assert result["output"].startswith("cloudtrain smoke test on x86_64 with Python 3.")
    assert result["price_source"] == "estimate: on-demand × 0.35"  # the simulator's quote, said as such
    by_name = {p["phase"]: p["detail"] for p in result["phases"]}
    assert "ubuntu-jammy-22.04-amd64-server" in by_name["image"]
    assert "SSH from 127.0.0.1/32 only" in by_name["security group"]
    assert "IMDSv2 required" in by_name["launch"] and "pinned" in by_name["host key"]
    assert 0 < result["cost_usd"] < 0.01
    # the launch was spot, of the small type, with IMDSv2 required, and it is gone
    cloud = AwsCloud(ensure_simulator(settings), "us-east-1")
    (instance,) = [
        i
        for r in cloud.ec2.describe_instances(InstanceIds=[result["instance"]])["Reservations"]
        for i in r["Instances"]
    ]
    assert instance["InstanceLifecycle"] == "spot" and instance["InstanceType"] == "t3.micro"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert live_instances(settings, result["run_id"]) == []
    assert cloud.owned_resources(settings.owner, result["run_id"]) == []
    record = status(result["run_id"])
    assert record["state"] == "succeeded" and record["name"] == "doctor-launch"
    # the table a person reads: each phase's seconds, and the cost
    shown = subprocess.run([CLOUDTRAIN, "doctor", "--launch", "--dry-run"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [line.split("  ")[0].strip() for line in lines[:-1]] == PHASES
    assert (
        lines[-1].startswith("ok doctor-launch-") and "cost $0.0" in lines[-1] and "(simulated)" in lines[-1]
    )


def test_a_failing_phase_still_removes_everything(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smoketest, "COMMAND", "echo broken; exit 7")
    with pytest.raises(RemoteError, match="exit code 7"):
        launch_smoke_test(settings, dry_run=True)
    active = ensure_simulator(settings)
    with Ledger.open(active) as ledger:
        (run,) = ledger.list_runs()
    assert run.state.value == "failed"
    assert AwsCloud(active, "us-east-1").owned_resources(settings.owner, run.id) == []


def test_without_a_terminal_or_yes_nothing_is_launched(tmp_path: Path) -> None:
    done = subprocess.run(
        [CLOUDTRAIN, "doctor", "--launch"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 2 and "Pass --yes" in done.stderr
    assert "launching" not in done.stderr


def test_the_real_aws_check_refuses_without_its_variable_and_is_not_in_ci() -> None:
    import configparser
    import os
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "CLOUDTRAIN_AWS_TESTS"}
    done = subprocess.run(
        [sys.executable, str(repo / "tests" / "real_aws.py")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and "CLOUDTRAIN_AWS_TESTS=1" in done.stderr
    tox = configparser.ConfigParser()
    tox.read(repo / "tox.ini")
    assert "aws" not in tox["tox"]["env_list"].replace(",", " ").split()  # what `tox` and CI run
    assert tox["testenv:aws"]["commands"].strip() == "python tests/real_aws.py"


def test_a_failure_right_after_launch_still_bills_and_removes_the_instance(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloudtrain.errors import CloudError

    def never_running(self: AwsCloud, instance_id: str, **_: object) -> None:
        raise CloudError(f"{instance_id} did not start")

    monkeypatch.setattr(AwsCloud, "wait_running", never_running)
    with pytest.raises(CloudError, match="did not start"):
        launch_smoke_test(settings, dry_run=True)
    active = ensure_simulator(settings)
    with Ledger.open(active) as ledger:
        (run,) = ledger.list_runs()
        (instance,) = ledger.instances(run.id)  # recorded at launch, before it ran
        events = [e.kind for e in ledger.events(run.id)]
    assert run.state.value == "failed" and run.exit_code == 3 and "error" in events
    assert instance.instance_type == "t3.micro" and instance.terminated_at is not None
    assert AwsCloud(active, "us-east-1").owned_resources(settings.owner, run.id) == []
