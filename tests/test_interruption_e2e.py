"""Spot interruptions end to end in `--dry-run`: the simulator's IMDS gives the notice, the
training checkpoints itself, the controller copies the checkpoint home, relaunches when
the instance is gone, restores, and the run ends with exactly the epochs asked for."""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_run_e2e import (  # noqa: F401  (sim_image: a fixture)
    cloudtrain,
    live_instances,
    logs_follower,
    only_run,
    sim_image,
    status,
)
from test_s3_data import s3_client

from cloudtrain.api import run_job
from cloudtrain.cloud.aws import AwsCloud
from cloudtrain.cloud.simulator import ensure_simulator, schedule_interruption, sim_dir
from cloudtrain.progress import Reporter
from cloudtrain.records import RunState
from cloudtrain.recovery import KEEPER_POLL_S
from cloudtrain.settings import Settings

EPOCHS = 8

# A seed-style Keras 3 script: nothing in it knows about checkpoints. The sleep stands in
# for a real epoch's length, so that the notice lands while it trains.
TRAIN = textwrap.dedent(f"""
    import os, time
    import numpy as np
    import keras
    x = np.random.rand(256, 8).astype("float32")
    y = (x.sum(axis=1) > 4).astype("float32")
    model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    slow = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: time.sleep(1.5))
    model.fit(x, y, epochs={EPOCHS}, batch_size=32, verbose=2, callbacks=[slow])
    os.makedirs("outputs", exist_ok=True)
    model.save_weights("outputs/model.weights.h5")
    print("saved", flush=True)
""")


@pytest.fixture
def quick_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDTRAIN_SIM_NOTICE_S", "5")  # the notice period (AWS: two minutes)
    monkeypatch.setenv("CLOUDTRAIN_IMDS_POLL_S", "0.5")  # the agent's IMDS polling (AWS: <= 5 s)


def job(folder: Path, extra: str = "", train: str = TRAIN) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(train)
    (folder / "job.yaml").write_text(
        "name: interrupted\nrun: python train.py\noutputs: [outputs/]\nseed: 3\nresources: {gpu: T4}\n"
        + extra
    )
    return folder / "job.yaml"


def epochs_started(log: str) -> list[int]:
    return [int(n) for n in re.findall(rf"^Epoch (\d+)/{EPOCHS}$", log, re.M)]


def interrupted_run(tmp_path: Path, *ats: str, train: str = TRAIN) -> tuple[Path, dict[str, Any], str]:
    """`run --dry-run` of the job with --simulate-interruption for each AT: (run folder,
    status record, stderr); the run must have succeeded."""
    out = tmp_path / "runs"
    simulate = [arg for at in ats for arg in ("--simulate-interruption", at)]
    job_file = job(tmp_path / "job", train=train)
    done = cloudtrain("run", str(job_file), "--dry-run", "--out", str(out), *simulate)
    assert done.returncode == 0, done.stderr
    run_dir = only_run(out)
    record = status(run_dir.name)
    assert record["state"] == "succeeded"
    return run_dir, record, done.stderr


def restored_epochs(record: dict[str, Any]) -> list[int]:
    """The epoch of each checkpoint restored on a relaunched instance, in order."""
    return [
        int(re.search(r"epoch (\d+)", e["message"]).group(1))  # type: ignore[union-attr]
        for e in record["events"]
        if e["kind"] == "restore"
    ]


def split_at_last_resume(started: list[int], restored: int) -> tuple[list[int], list[int]]:
    """Epochs started before the last instance, and on it (it begins at ``restored + 1``)."""
    cut = len(started) - 1 - started[::-1].index(restored + 1)
    return started[:cut], started[cut:]


def one_after_another(instances: list[dict[str, Any]]) -> bool:
    """Every instance ended, and none was launched before the one before it ended."""
    ended = all(i["ended_at"] is not None for i in instances)
    return ended and all(
        a["ended_at"] <= b["launched_at"] for a, b in zip(instances, instances[1:], strict=False)
    )


def test_two_spot_interruptions_are_survived_without_losing_finished_epochs(
    sim_image: Path, tmp_path: Path, settings: Settings, quick_notices: None
) -> None:
    # the 2nd notice comes on the relaunched instance, as its training reaches epoch 6
    run_dir, record, stderr = interrupted_run(tmp_path, "epoch:3", "epoch:6")
    kinds = [e["kind"] for e in record["events"]]
    assert "notice" in kinds and "restore" in kinds and "recovering" in kinds
    assert kinds.count("interrupted") == 2
    restores = restored_epochs(record)
    assert len(restores) == 2 and 2 <= restores[0] < restores[1] < EPOCHS
    # 2: the epochs finished before the first notice came home

    # Three instances, one after the other: never two at once, none left.
    assert len(record["instances"]) == 3 and one_after_another(record["instances"])
    assert live_instances(settings, run_dir.name) == []

    # The log shows each notice, interruption and resume; no finished epoch is redone
    # except the one in progress, and the run ends with exactly the epochs asked for.
    log = (run_dir / "logs" / "train.log").read_text()
    assert "spot interruption notice" in log
    earlier, last = split_at_last_resume(epochs_started(log), restores[1])
    first, middle = split_at_last_resume(earlier, restores[0])
    assert first == list(range(1, len(first) + 1)) and len(first) <= restores[0] + 1  # lost: at most one
    assert middle == list(range(restores[0] + 1, len(middle) + restores[0] + 1))
    assert len(middle) <= restores[1] - restores[0] + 1
    assert last == list(range(restores[1] + 1, EPOCHS + 1))
    for epoch in restores:
        assert f"restored epoch {epoch}" in log
        assert f"holding at epoch {epoch} (saved)" in log  # near the end it waits, saved
    assert (run_dir / "outputs" / "outputs" / "model.weights.h5").is_file()
    assert "relaunching (1/3)" in stderr and "relaunching (2/3)" in stderr
    # the three instances' metrics are one series: each epoch once, in order
    rows = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[1]) for row in rows] == list(range(1, EPOCHS + 1))
    assert record["progress"]["epoch"] == EPOCHS


FAST_EPOCHS = 80

# Saves that come faster than a copy takes: 8 MB of weights and Adam state per save, as
# fast as the epochs go (a tenth of a second or two each). Each epoch's start is stamped
# (time.time()): epoch N's save is done by the time epoch N + 1 starts (the checkpoint is
# the last callback of an epoch's end), which errs, by milliseconds, towards asking less.
FAST_TRAIN = textwrap.dedent(f"""
    import os, time
    import numpy as np
    import keras
    x = np.random.rand(128, 256).astype("float32")
    y = (x.sum(axis=1) > 128).astype("float32")
    model = keras.Sequential([keras.Input(shape=(256,)), keras.layers.Dense(1024, activation="relu"),
                              keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    stamps = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: print(f"began epoch {{epoch + 1}} at {{time.time():.3f}}", flush=True),
    )
    model.fit(x, y, epochs={FAST_EPOCHS}, batch_size=64, verbose=2, callbacks=[stamps])
    os.makedirs("outputs", exist_ok=True)
    model.save_weights("outputs/model.weights.h5")
""")


def sim_log_time(settings: Settings, pattern: str) -> float:
    """When the simulator logged a line matching ``pattern`` (time.time(); its log's
    timestamps are local time, to the millisecond)."""
    text = (sim_dir(settings) / "sim.log").read_text()
    found = re.search(rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{{3}}) .*{pattern}", text, re.M)
    assert found, f"no {pattern!r} in sim.log"
    return time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")) + int(found.group(2)) / 1000


def test_an_instance_lost_without_notice_resumes_from_a_save_one_keeper_round_old(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    # No notice ever shows in IMDS: the instance is simply gone as epoch 60 starts. The
    # trainer saves faster than a copy takes; the keeper must have brought home a recent
    # save all the same.
    run_dir, record, stderr = interrupted_run(tmp_path, "epoch:60:no-notice", train=FAST_TRAIN)
    kinds = [e["kind"] for e in record["events"]]
    assert kinds.count("interrupted") == 1 and "notice" not in kinds
    assert len(record["instances"]) == 2 and one_after_another(record["instances"])
    assert live_instances(settings, run_dir.name) == []
    log = (run_dir / "logs" / "train.log").read_text()
    assert "interruption notice" not in log and "holding at epoch" not in log

    # The save the keeper must have brought home: the last one done more than a round's
    # interval (KEEPER_POLL_S, or a copy's time when copies take longer) plus a copy's
    # time before the instance was lost.
    lost_at = sim_log_time(settings, "taken away with no notice")
    copy_s = max(
        (
            float(found.group(1))
            for e in record["events"]
            if (found := re.search(r"copied home \(.* in ([\d.]+) s\)", e["message"]))
        ),
        default=0.0,
    )
    began = {int(n): float(t) for n, t in re.findall(r"^began epoch (\d+) at ([\d.]+)$", log, re.M)
             if float(t) < lost_at}  # fmt: skip
    home_by = lost_at - max(KEEPER_POLL_S, copy_s) - copy_s
    due = max((n - 1 for n, t in began.items() if t <= home_by), default=0)
    assert due >= 5, f"the instance trained too little before it was lost to test anything: {sorted(began)}"
    restores = restored_epochs(record)
    assert len(restores) == 1, f"nothing came home before the loss, though epoch {due} was due"
    restored = restores[0]
    assert restored >= due, (
        f"restored epoch {restored}; {due} was saved {lost_at - home_by:.1f} s before the loss"
    )
    assert f"restored epoch {restored} from" in log  # the replacement says so

    # Nothing trained from scratch again: epochs 1..restored on the first instance (and
    # those after it, up to the loss), restored + 1.. on the replacement.
    started = [int(n) for n in re.findall(rf"^Epoch (\d+)/{FAST_EPOCHS}$", log, re.M)]
    assert started.count(1) == 1
    first, second = split_at_last_resume(started, restored)
    assert first == list(range(1, len(first) + 1)) and len(first) >= restored
    assert second == list(range(restored + 1, FAST_EPOCHS + 1))
    assert (run_dir / "outputs" / "outputs" / "model.weights.h5").is_file()
    assert "relaunching (1/3)" in stderr


def wait_for(what: str, check: Any, timeout: float = 120.0) -> Any:
    end = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.25)
    return found


def test_a_detached_run_taken_away_unwatched_resumes_from_s3_on_attach(
    sim_image: Path, tmp_path: Path, settings: Settings, quick_notices: None
) -> None:
    sim = ensure_simulator(settings, image=sim_image)
    s3 = s3_client(sim.endpoint_url)
    s3.create_bucket(Bucket="checkpoints")
    out = tmp_path / "runs"
    job_file = job(tmp_path / "job", extra="checkpoint: {s3: 's3://checkpoints/team/'}\n")
    cloudtrain("run", str(job_file), "--dry-run", "--detach", "--out", str(out), check=True)
    run_dir = only_run(out)
    run_id = run_dir.name
    key = f"team/{run_id}/manifest.json"

    def s3_epoch() -> int:
        try:
            return int(json.loads(s3.get_object(Bucket="checkpoints", Key=key)["Body"].read())["epoch"])
        except s3.exceptions.NoSuchKey:
            return 0

    # The instance keeps its checkpoint in S3 by itself: no controller is following it,
    # only `logs -f`, which goes on with the replacement's log once `attach` relaunches.
    follower = logs_follower(run_id)
    wait_for("epoch 2 in S3", lambda: s3_epoch() >= 2)
    (first,) = live_instances(settings, run_id)
    schedule_interruption(settings, first, notice_s=2)
    wait_for("the interrupted instance to be gone", lambda: live_instances(settings, run_id) == [])
    in_s3 = s3_epoch()
    assert 2 <= in_s3 < EPOCHS
    assert not (run_dir / "checkpoint").exists()  # nothing was copied home

    attached = cloudtrain("attach", run_id)
    followed, waited = follower.communicate(timeout=120)
    assert follower.returncode == 0, waited
    assert f"{first} was taken away; waiting for {run_id} to go on on a new instance" in waited
    before, after = split_at_last_resume(epochs_started(followed), in_s3)
    assert before[:2] == [1, 2] and after == list(range(in_s3 + 1, EPOCHS + 1))
    assert attached.returncode == 0, attached.stderr
    assert "is terminated: the instance was taken away; relaunching (1/3)" in attached.stderr
    record = status(run_id)
    assert record["state"] == "succeeded"
    (restore,) = [e["message"] for e in record["events"] if e["kind"] == "restore"]
    assert restore == f"restoring the checkpoint of epoch {in_s3} from s3://checkpoints/team/{run_id}/"
    assert len(record["instances"]) == 2 and one_after_another(record["instances"])
    assert live_instances(settings, run_id) == []
    log = (run_dir / "logs" / "train.log").read_text()  # the replacement's: the first's went with it
    assert epochs_started(log) == list(range(in_s3 + 1, EPOCHS + 1))
    assert (run_dir / "outputs" / "outputs" / "model.weights.h5").is_file()
    assert s3_epoch() == EPOCHS  # the last checkpoint reached S3 before the run ended


class PhaseInterrupter(Reporter):
    """Takes each instance away as a given phase of it begins: the 1st instance at its
    1st phase, ... A phase is a run state, or a line that starts in the training log;
    "rebalance@LINE" only recommends a rebalance there. Termination is waited for, so
    the phase meets a dead instance."""

    def __init__(self, settings: Settings, phases: list[list[str]]) -> None:
        self.settings = settings
        self.phases = phases
        self.instances: list[str] = []
        self.done: list[str] = []
        self.warnings: list[str] = []
        self.partial = b""

    def info(self, message: str) -> None:
        found = re.match(r"^(i-[0-9a-f]+) is running in ", message)
        if found:
            self.instances.append(found.group(1))

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def stage(self, state: RunState, message: str) -> None:
        self._reached(state.value)

    def log(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self._reached(line.decode())

    def _reached(self, text: str) -> None:
        if not self.instances or len(self.instances) > len(self.phases):
            return
        instance, todo = self.instances[-1], self.phases[len(self.instances) - 1]
        for phase in list(todo):
            rebalance = phase.startswith("rebalance@")
            if not text.startswith(phase.removeprefix("rebalance@")):
                continue
            todo.remove(phase)
            self.done.append(phase)
            if rebalance:
                schedule_interruption(self.settings, instance, kind="rebalance")
            else:
                self._take_away(instance)
            return

    def _take_away(self, instance: str) -> None:
        schedule_interruption(self.settings, instance, notice_s=0)
        cloud = AwsCloud(ensure_simulator(self.settings), "us-east-1")
        wait_for(f"{instance} to be taken away", lambda: cloud.describe(instance).state != "running")
        time.sleep(0.5)  # its host goes in the same step of the simulator


def test_interruptions_during_sync_setup_and_pull_back_and_a_rebalance(
    sim_image: Path, tmp_path: Path, settings: Settings, quick_notices: None
) -> None:
    folder = tmp_path / "job"
    job_file = job(folder, extra="setup: echo preparing; sleep 1\n")
    reporter = PhaseInterrupter(
        settings,
        [
            ["syncing"],  # the 1st instance, as the workdir sync starts
            ["[cloudtrain] setup:"],  # the 2nd, in the job's setup
            ["rebalance@Epoch 2/", "pulling"],  # the 3rd: a rebalance (no relaunch), then the pull-back
        ],
    )
    outcome = run_job(job_file, settings, dry_run=True, out_dir=tmp_path / "runs", reporter=reporter)
    assert outcome.exit_code == 0
    assert reporter.done == ["syncing", "[cloudtrain] setup:", "rebalance@Epoch 2/", "pulling"]
    record = status(outcome.run_id)
    assert record["state"] == "succeeded"
    assert [e["kind"] for e in record["events"]].count("interrupted") == 3
    assert len(record["instances"]) == 4 and one_after_another(record["instances"])
    assert [i["id"] for i in record["instances"]] == reporter.instances
    assert live_instances(settings, outcome.run_id) == []
    assert any("relaunching (3/3)" in w for w in reporter.warnings)

    # The rebalance made the 3rd instance save at once, and it trained on: every epoch
    # trained once, in order, across the run.
    log = (outcome.run_dir / "logs" / "train.log").read_text()
    assert "rebalance recommendation" in log
    assert epochs_started(log) == list(range(1, EPOCHS + 1))
    # Taken away during the pull-back: the 4th restored the finished training and only
    # ran the script's saving again.
    assert restored_epochs(record) == [EPOCHS]
    assert "fit 0 had finished" in log
    assert (outcome.run_dir / "outputs" / "outputs" / "model.weights.h5").is_file()


# The keras-io style of issue 12: `from tensorflow import keras` on `keras: 2` (tf-keras),
# one fit(epochs=1) per iteration. Keras prints no "Epoch 1/1" for epochs=1, so the notice
# is given as iteration 4 begins (the script's own line), not by --simulate-interruption.
ITERATIONS = 8
LOOP = textwrap.dedent(f"""
    import os, time
    import numpy as np
    from tensorflow import keras
    x = np.random.rand(256, 8).astype("float32")
    y = (x.sum(axis=1) > 4).astype("float32")
    model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    for iteration in range(1, {ITERATIONS} + 1):
        print("Iteration", iteration, flush=True)
        mark = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: print("training iteration", iteration, flush=True),
            on_epoch_end=lambda epoch, logs: time.sleep(1.5),
        )
        history = model.fit(x, y, epochs=1, batch_size=32, verbose=2, callbacks=[mark])
        print("loss of iteration", iteration, history.history["loss"][-1], flush=True)
    os.makedirs("outputs", exist_ok=True)
    model.save_weights("outputs/model.h5")
""")


class NoticeAt(PhaseInterrupter):
    """Gives each instance a spot notice as its phase begins (CLOUDTRAIN_SIM_NOTICE_S to go)."""

    def _take_away(self, instance: str) -> None:
        schedule_interruption(self.settings, instance)


def test_a_keras_2_loop_of_one_epoch_fits_through_tf_keras_resumes_at_the_next_iteration(
    sim_image: Path, tmp_path: Path, settings: Settings, quick_notices: None
) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "train.py").write_text(LOOP)
    (folder / "job.yaml").write_text(
        "name: keras-io-loop\nrun: python train.py\noutputs: [outputs/]\nkeras: 2\nresources: {gpu: T4}\n"
    )
    reporter = NoticeAt(settings, [["Iteration 4"]])
    outcome = run_job(
        folder / "job.yaml", settings, dry_run=True, out_dir=tmp_path / "runs", reporter=reporter
    )
    assert outcome.exit_code == 0, reporter.warnings
    assert reporter.done == ["Iteration 4"]
    record = status(outcome.run_id)
    assert record["state"] == "succeeded" and len(record["instances"]) == 2
    assert one_after_another(record["instances"]) and live_instances(settings, outcome.run_id) == []
    (restore,) = [e["message"] for e in record["events"] if e["kind"] == "restore"]
    assert restore.startswith("restoring the checkpoint of epoch 1")  # each fit has one epoch

    # Both instances' logs: the first trained iterations 1..B; after the notice it held
    # before the next fit, saved, until taken. The replacement replayed the finished
    # iterations untrained (each gave the script its loss back) and trained from R on.
    log = (outcome.run_dir / "logs" / "train.log").read_text()
    first, replacement = log.split("checkpoint: restored epoch 1 of fit ", 1)
    before = [int(n) for n in re.findall(r"^training iteration (\d+)$", first, re.M)]
    after = [int(n) for n in re.findall(r"^training iteration (\d+)$", replacement, re.M)]
    assert after, replacement
    resumed_at = after[0]
    assert before == list(range(1, len(before) + 1)) and after == list(range(resumed_at, ITERATIONS + 1))
    assert 4 <= resumed_at <= len(before) + 1  # at most the iteration in progress trained twice
    assert "holding before fit" in first
    assert replacement.startswith(f"{resumed_at - 2} from ")  # the state of the last finished fit
    assert "fit 0 had finished; its model trained on in fit" in replacement
    assert f"has none for fit {resumed_at - 1}: it starts at epoch 1" in replacement
    losses = re.findall(r"^loss of iteration (\d+) ", replacement, re.M)
    assert losses == [str(n) for n in range(1, ITERATIONS + 1)]  # a History for every iteration
    assert (outcome.run_dir / "outputs" / "outputs" / "model.h5").is_file()
