"""The instance guards itself (agent/watchdog.py): it powers off at the run's deadline (after
a last checkpoint, the job stopped) or when nobody collects an ended run within the grace,
whatever the controller does. The power-off hook stands in for the machine going away."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from test_agent import Agent, agent, write_script
from test_run_e2e import cloudtrain, live_instances, only_run, py, run_until, sim_image, status, write_job

from cloudtrain.agent.watchdog import (
    COLLECTED,
    IDLE_MARGIN_S,
    RENEWED,
    Watchdog,
    decide,
    idle_inside_call,
    renew,
)
from cloudtrain.settings import Settings

__all__ = ["agent", "sim_image"]  # fixtures, imported for their use here


def iso_in(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)
    return found


def test_the_rules(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    now = time.time()
    config = {"deadline": iso_in(3600), "grace_s": 60}
    assert decide(config, str(run), now) is None  # the job runs, the deadline is far
    assert decide(dict(config, deadline=iso_in(-1)), str(run), now) == "deadline"
    renew(str(run), iso_in(7200))  # a following controller moved it on
    assert decide(dict(config, deadline=iso_in(-1)), str(run), now) is None
    assert decide(config, str(run), now + 7201) == "deadline"
    (run / RENEWED).unlink()

    (run / "exit_code").write_text("0\n")
    os.utime(run / "exit_code", (now - 30, now - 30))
    assert decide(config, str(run), now) is None  # ended 30 s ago: within the grace
    assert decide(config, str(run), now + 31) == "uncollected"

    (run / COLLECTED).write_text(json.dumps({"at": iso_in(0), "keep_until": None}))
    assert decide(config, str(run), now + 31) is None  # a collection starts the grace again
    assert decide(config, str(run), now + 61) == "uncollected"

    (run / COLLECTED).write_text(json.dumps({"at": iso_in(0), "keep_until": iso_in(600)}))
    assert decide(config, str(run), now + 500) is None  # --keep: only its deadline counts
    assert decide(config, str(run), now + 601) == "deadline"


def test_the_stall_rule_when_no_controller_stopped_the_run_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    config = {"deadline": iso_in(3600), "grace_s": 60, "max_idle_s": 30.0, "on_idle": "stop"}
    (run / "train.log").write_text("Epoch 1/5\n")
    changed = time.time()
    os.utime(run / "train.log", (changed, changed))
    late = changed + 30 + IDLE_MARGIN_S  # the controller acts at 30 s; the watchdog after its margin
    assert idle_inside_call(config, str(run), late) is None  # no hooked Keras call yet
    (run / "progress.json").write_text(json.dumps({"call": "fit", "active": True, "epoch": 2}))
    os.utime(run / "progress.json", (changed - 5, changed - 5))
    assert idle_inside_call(config, str(run), late - 1) is None  # the log changed last: not yet
    assert idle_inside_call(config, str(run), late) == 30 + IDLE_MARGIN_S
    assert idle_inside_call(dict(config, on_idle="warn"), str(run), late) is None
    assert idle_inside_call(dict(config, max_idle_s=None), str(run), late) is None
    assert idle_inside_call(dict(config, idle_stopped_at=iso_in(0)), str(run), late) is None  # once
    (run / "progress.json").write_text(json.dumps({"active": False}))
    os.utime(run / "progress.json", (changed - 5, changed - 5))
    assert idle_inside_call(config, str(run), late) is None  # between calls: the controller only warns
    (run / "progress.json").write_text(json.dumps({"call": "fit", "active": True}))
    (run / "exit_code").write_text("0\n")
    assert idle_inside_call(config, str(run), late + 600) is None  # ended


def hook(agent: Agent, tmp_path: Path) -> Path:
    marker = tmp_path / "powered-off"
    write_script(Path(agent.env["HOME"]) / ".cloudtrain" / "poweroff", f'#!/bin/sh\necho "$1" >> {marker}\n')
    return marker


def test_an_ended_run_nobody_collects_powers_off_after_the_grace(agent: Agent, tmp_path: Path) -> None:
    marker = hook(agent, tmp_path)
    run_dir = tmp_path / "run"
    agent.start(run_dir, "echo trained")
    out = agent.json(
        "watchdog", "--run-dir", str(run_dir), "--workdir", str(tmp_path / "work"),
        "--deadline", iso_in(3600), "--grace", "1.5", "--poll", "0.1",
    )  # fmt: skip
    assert out["already"] is False
    # A second start finds the first one alive.
    again = agent.json(
        "watchdog", "--run-dir", str(run_dir), "--workdir", str(tmp_path / "work"), "--deadline", iso_in(60)
    )
    assert again == {"pid": out["pid"], "already": True, "deadline": out["deadline"]}
    assert wait_for(lambda: marker.exists()) and marker.read_text() == "watchdog-uncollected\n"
    ended = os.path.getmtime(run_dir / "exit_code")
    assert os.path.getmtime(marker) - ended >= 1.5
    log = (run_dir / "train.log").read_text()
    assert "watchdog: nobody collected the outputs within 1.5 s of the end" in log
    state = json.loads((run_dir / "watchdog.json").read_text())
    assert state["reason"] == "uncollected" and state["powered_off_at"]


def test_a_collected_run_is_left_until_the_grace_runs_out_again(agent: Agent, tmp_path: Path) -> None:
    marker = hook(agent, tmp_path)
    run_dir = tmp_path / "run"
    agent.start(run_dir, "echo trained")
    wait_for(lambda: (run_dir / "exit_code").exists())
    agent.json(
        "watchdog", "--run-dir", str(run_dir), "--workdir", str(tmp_path / "work"),
        "--deadline", iso_in(3600), "--grace", "3", "--poll", "0.1",
    )  # fmt: skip
    for _ in range(4):  # a controller pulling every second keeps it up
        time.sleep(1)
        agent.json("collected", "--run-dir", str(run_dir))
        assert not marker.exists()
    assert wait_for(lambda: marker.exists(), timeout=10)
    kept = agent.json("collected", "--run-dir", str(run_dir), "--keep-until", iso_in(3600))
    assert kept["keep_until"]


def test_the_deadline_saves_then_stops_the_job_then_powers_off(agent: Agent, tmp_path: Path) -> None:
    marker = hook(agent, tmp_path)
    run_dir = tmp_path / "run"
    # A stand-in for a training job with a checkpoint hook: on the notice it saves (a new
    # manifest), then trains on until it is stopped.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    job = agent.py(
        "import json, os, time\n"
        f"notice, manifest = {str(run_dir / 'notice.json')!r}, {str(ckpt / 'manifest.json')!r}\n"
        "while not os.path.exists(notice): time.sleep(0.05)\n"
        "print('saw', json.load(open(notice))['kind'], flush=True)\n"
        "open(manifest, 'w').write('{\"epoch\": 3}')\n"
        "time.sleep(300)\n"
    )
    run_dir.mkdir()
    env_file = run_dir / "env.json"  # where `backend` writes it
    env_file.write_text(json.dumps({"CLOUDTRAIN_CHECKPOINT_DIR": str(ckpt)}))
    agent.start(run_dir, job, "--env-file", str(env_file))
    wait_for(lambda: (run_dir / "state.json").exists())
    agent.json(
        "watchdog", "--run-dir", str(run_dir), "--workdir", str(tmp_path / "work"),
        "--deadline", iso_in(0), "--grace", "600", "--poll", "0.1",
    )  # fmt: skip
    assert wait_for(lambda: marker.exists(), timeout=60) and marker.read_text() == "watchdog-deadline\n"
    log = (run_dir / "train.log").read_text()
    assert "saw deadline" in log  # told to save first
    assert (ckpt / "manifest.json").exists()
    assert (run_dir / "exit_code").exists()  # then stopped: the job ended before the power-off
    assert log.index("saw deadline") < log.index("watchdog: powering the instance off")
    assert "run exited with code 143 (SIGTERM)" in log or "SIGKILL" in log


def test_outputs_and_log_go_to_the_runs_s3_prefix_before_the_power_off(tmp_path: Path) -> None:
    run_dir, work = tmp_path / "run", tmp_path / "work"
    (work / "outputs" / "sub").mkdir(parents=True)
    (work / "outputs" / "model.weights.h5").write_bytes(b"weights")
    (work / "outputs" / "sub" / "preds.csv").write_text("1,2\n")
    (work / "other.txt").write_text("not an output")
    run_dir.mkdir()
    (run_dir / "train.log").write_text("epoch 1\n")
    config = {
        "workdir": str(work),
        "outputs": ["outputs/"],
        "s3": "s3://keep/team/run-1/",
        "region": "us-east-1",
    }
    (run_dir / "watchdog.json").write_text(json.dumps(config))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="keep")
        Watchdog(str(run_dir)).upload_outputs()
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="keep")["Contents"])
        body = s3.get_object(Bucket="keep", Key="team/run-1/outputs/outputs/model.weights.h5")["Body"].read()
    assert keys == [
        "team/run-1/logs/train.log",
        "team/run-1/outputs/outputs/model.weights.h5",
        "team/run-1/outputs/outputs/sub/preds.csv",
    ]
    assert body == b"weights"
    assert (
        "put 3 files (outputs, train.log) under s3://keep/team/run-1/" in (run_dir / "train.log").read_text()
    )


@pytest.mark.parametrize("bad", ["tomorrow", "2026-11-28 12:00"])
def test_a_bad_deadline_is_refused(agent: Agent, tmp_path: Path, bad: str) -> None:
    out = agent.json(
        "watchdog",
        "--run-dir",
        str(tmp_path / "run"),
        "--workdir",
        str(tmp_path),
        "--deadline",
        bad,
        expect=2,
    )
    assert "--deadline" in out["error"]


# --- end to end, in dry-run ---------------------------------------------------------------

STEPS = (
    "import os, time\nfor i in range({n}): print('step', i, flush=True); time.sleep(0.2)\n"
    "os.makedirs('outputs', exist_ok=True)\nopen('outputs/final.txt', 'w').write('final')\n"
    "print('finished', flush=True)"
)


def test_a_killed_controller_leaves_the_instance_to_guard_itself(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    job = write_job(tmp_path / "job", py(STEPS.format(n=40)), extra="watchdog: {collect_grace_s: 6}\n")
    out = tmp_path / "runs"
    code, _, _ = run_until(job, out, "step 3", signal.SIGKILL, watch="stdout")
    assert code == -signal.SIGKILL
    run_id = only_run(out).name
    (instance,) = live_instances(settings, run_id)  # the controller is gone; the training is not

    # `pull` within the grace brings the outputs home (each pull starts the grace again).
    final = only_run(out) / "outputs" / "outputs" / "final.txt"
    for _ in range(120):
        cloudtrain("pull", run_id, check=True)
        if final.exists():
            break
        time.sleep(0.5)
    assert final.read_text() == "final"
    assert "finished" in (only_run(out) / "logs" / "train.log").read_text()

    # Nobody collects it again: the instance powers itself off, and the simulated AWS
    # terminates it, once the grace has run out.
    collected_at = time.monotonic()
    wait_for(lambda: live_instances(settings, run_id) == [], timeout=60)
    assert time.monotonic() - collected_at >= 4  # not before the grace (6 s, less the pull's own time)
    sandbox = Path(os.environ["CLOUDTRAIN_HOME"]) / "sim" / "instances" / instance
    (state,) = sandbox.rglob("watchdog.json")
    assert json.loads(state.read_text())["reason"] == "uncollected"
    assert cloudtrain("down", run_id).returncode == 0  # the ledger catches up; nothing is left


def test_a_budget_reached_mid_run_stops_it_with_exit_4(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    job = write_job(tmp_path / "job", py(STEPS.format(n=400)), extra="budget: {max_hours: 0.003}\n")  # 10.8 s
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 4, done.stderr
    assert "budget.max_hours reached:" in done.stderr and "of 0.003 h since the run started" in done.stderr
    assert "so far: $" in done.stderr and "(budget: 0.003 h)" in done.stderr  # shown while it ran
    run_dir = only_run(tmp_path / "runs")
    record = status(run_dir.name)
    assert record["state"] == "failed" and any(e["kind"] == "budget" for e in record["events"])
    assert live_instances(settings, run_dir.name) == []
    log = (run_dir / "logs" / "train.log").read_text()
    assert "step 10\n" in log and "\nfinished\n" not in log  # what there was came home; it did not finish
