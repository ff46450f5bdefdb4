"""Checkpoints in S3 (`checkpoint: {s3: ...}`): the agent's uploader and restore against moto,
the run's role allowed to write only its own checkpoint prefix, and the bucket checked
before anything is launched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from test_run_e2e import cloudtrain, live_instances, only_run, py, sim_image, status, write_job

from cloudtrain.agent import checkpoint
from cloudtrain.agent.errors import AgentError
from cloudtrain.agent.s3_checkpoint import Uploader, restore
from cloudtrain.cloud.aws import AwsCloud, s3_read_policy
from cloudtrain.cloud.simulator import ensure_simulator
from cloudtrain.settings import Settings

__all__ = ["sim_image"]  # the e2e fixture, imported for its use here

BUCKET = "ckpt-bucket"
URL = f"s3://{BUCKET}/team/job-20261128-120000-abcd/"
NAMES = ("weights.npz", "optimizer.npz", "extra.npz", "state.json")


@pytest.fixture
def s3() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def save(store: checkpoint.Store, epoch: int, fit: int = 0) -> str:
    payload = {n: f"{n}:{fit}:{epoch}".encode() * 100 for n in NAMES}
    return store.save(fit, epoch, payload, {"epochs": 9, "complete": False}, {"flavour": "test"})


def keys(s3: Any) -> list[str]:
    found = s3.list_objects_v2(Bucket=BUCKET, Prefix="team/").get("Contents", [])
    return sorted(o["Key"][len("team/job-20261128-120000-abcd/") :] for o in found)


def test_each_checkpoint_reaches_s3_manifest_last_and_old_folders_go(s3: Any, tmp_path: Path) -> None:
    store = checkpoint.Store(str(tmp_path / "ckpt"))
    events: list[tuple[str, dict[str, Any]]] = []
    uploader = Uploader(store.directory, URL, on_event=lambda kind, info: events.append((kind, info)))
    first = save(store, 1)
    assert uploader.upload() is not None
    assert keys(s3) == sorted([f"{first}/{n}" for n in NAMES] + ["manifest.json"])
    assert uploader.upload() is None  # unchanged: nothing put again

    second, third = save(store, 2), save(store, 3)
    assert uploader.upload() is not None
    # The manifest before (epoch 1's) and this one (epoch 3's) name their folders; epoch 2's
    # never reached S3, and epoch 1's goes only with the next upload.
    assert {k.split("/")[0] for k in keys(s3)} == {first, third, "manifest.json"}
    save(store, 4)
    uploader.upload()
    assert first not in {k.split("/")[0] for k in keys(s3)}
    assert second not in str(keys(s3))
    body = s3.get_object(Bucket=BUCKET, Key="team/job-20261128-120000-abcd/manifest.json")["Body"].read()
    assert json.loads(body)["epoch"] == 4
    assert [info["epoch"] for kind, info in events if kind == "uploaded"] == [1, 3, 4]


def test_restore_takes_s3_only_when_it_is_further_on(s3: Any, tmp_path: Path) -> None:
    store = checkpoint.Store(str(tmp_path / "instance-a"))
    save(store, 1)
    save(store, 2)
    Uploader(store.directory, URL).upload()

    # A new instance with nothing: S3's checkpoint, whole and verified.
    fresh = tmp_path / "instance-b"
    assert restore(URL, str(fresh)) == {"source": "s3", "fit": 0, "epoch": 2}
    manifest = checkpoint.verify(str(fresh))
    assert manifest is not None and manifest["epoch"] == 2
    assert not (tmp_path / "instance-b.s3-incoming").exists()

    # The controller's copy pushed first is as far on: it stays.
    pushed = tmp_path / "instance-c"
    checkpoint_c = checkpoint.Store(str(pushed))
    save(checkpoint_c, 1)
    save(checkpoint_c, 2)
    before = (pushed / "manifest.json").read_bytes()
    assert restore(URL, str(pushed)) == {"source": "local", "fit": 0, "epoch": 2}
    assert (pushed / "manifest.json").read_bytes() == before

    # A later fit beats a higher epoch of an earlier one.
    save(checkpoint_c, 1, fit=1)
    assert restore(URL, str(pushed))["source"] == "local"

    # No checkpoint anywhere.
    s3.delete_object(Bucket=BUCKET, Key="team/job-20261128-120000-abcd/manifest.json")
    assert restore(URL, str(tmp_path / "instance-d")) == {"source": None, "fit": -1, "epoch": -1}


def test_an_upload_cut_short_leaves_the_previous_checkpoint_in_s3(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = checkpoint.Store(str(tmp_path / "ckpt"))
    save(store, 1)
    uploader = Uploader(store.directory, URL)
    uploader.upload()
    save(store, 2)

    client = uploader._client
    calls = {"n": 0}
    real = client.upload_file

    def dies_after_one_file(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("the instance was taken away")
        real(*args, **kwargs)

    monkeypatch.setattr(client, "upload_file", dies_after_one_file)
    events: list[str] = []
    uploader.on_event = lambda kind, info: events.append(kind)
    assert uploader.round() is False and events == ["error"]
    assert calls["n"] == 2  # one file of epoch 2 is in S3, its manifest is not

    restored = tmp_path / "replacement"
    assert restore(URL, str(restored))["epoch"] == 1
    assert checkpoint.verify(str(restored)) is not None

    monkeypatch.setattr(client, "upload_file", real)  # S3 back: the next round completes it
    assert uploader.round() is True and events[-1] == "uploaded"
    assert restore(URL, str(tmp_path / "later"))["epoch"] == 2


def test_a_damaged_s3_checkpoint_is_refused_and_the_local_one_kept(s3: Any, tmp_path: Path) -> None:
    store = checkpoint.Store(str(tmp_path / "ckpt"))
    folder = save(store, 3)
    Uploader(store.directory, URL).upload()
    s3.put_object(Bucket=BUCKET, Key=f"team/job-20261128-120000-abcd/{folder}/weights.npz", Body=b"x" * 10)
    local = tmp_path / "local"
    save(checkpoint.Store(str(local)), 1)
    with pytest.raises(AgentError, match="does not match the checkpoint's manifest"):
        restore(URL, str(local))
    manifest = checkpoint.verify(str(local))
    assert manifest is not None and manifest["epoch"] == 1


def test_the_role_writes_only_under_the_runs_checkpoint_prefix() -> None:
    policy = s3_read_policy(["data"], [URL])
    allowed = {(a, r) for s in policy["Statement"] for a in s["Action"] for r in s["Resource"]}
    prefix = "team/job-20261128-120000-abcd/"
    assert allowed == {
        ("s3:ListBucket", "arn:aws:s3:::data"),
        ("s3:GetObject", "arn:aws:s3:::data/*"),
        ("s3:ListBucket", f"arn:aws:s3:::{BUCKET}"),
        ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/{prefix}*"),
        ("s3:PutObject", f"arn:aws:s3:::{BUCKET}/{prefix}*"),
        ("s3:DeleteObject", f"arn:aws:s3:::{BUCKET}/{prefix}*"),
    }
    listing = [s for s in policy["Statement"] if s["Resource"] == [f"arn:aws:s3:::{BUCKET}"]]
    assert listing[0]["Condition"] == {"StringLike": {"s3:prefix": [f"{prefix}*"]}}
    assert not any("s3:PutObject" in s["Action"] for s in s3_read_policy(["data"])["Statement"])


def test_a_checkpoint_bucket_that_is_not_there_is_refused_before_launch(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    job = write_job(
        tmp_path / "job", py("print('never runs')"), extra="checkpoint: {s3: 's3://no-such-bucket/x/'}\n"
    )
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 2, done.stderr
    assert f"{job}: checkpoint.s3: there is no bucket no-such-bucket" in done.stderr
    assert "aws s3 mb s3://no-such-bucket" in done.stderr
    run_id = only_run(tmp_path / "runs").name
    cloud = AwsCloud(ensure_simulator(settings), "us-east-1")
    assert live_instances(settings, run_id) == []
    groups = cloud.ec2.describe_security_groups()["SecurityGroups"]
    assert not any(run_id in g["GroupName"] for g in groups)
    assert status(run_id)["state"] == "failed"


def test_a_file_pruned_by_a_newer_save_is_no_error(s3: Any, tmp_path: Path) -> None:
    store = checkpoint.Store(str(tmp_path / "ckpt"))
    folder = save(store, 1)
    (tmp_path / "ckpt" / folder / "weights.npz").unlink()  # as if the next save pruned it mid-upload
    events: list[str] = []
    uploader = Uploader(store.directory, URL, on_event=lambda kind, info: events.append(kind))
    assert uploader.round() is True and events == []  # no alarm
    assert "manifest.json" not in keys(s3)  # and no manifest naming a file S3 lacks
    save(store, 2)
    assert uploader.round() is True and events == ["uploaded"]
    assert restore(URL, str(tmp_path / "restored"))["epoch"] == 2


# A trainer saving 40 small files every 20 ms: an upload (a request per file) takes many saves.
MANY_FILE_SAVER = """
import os, sys, time
from cloudtrain.agent.checkpoint import Store
store, blob = Store(sys.argv[1]), os.urandom(50_000)
epoch = 0
while True:
    epoch += 1
    payload = {f"part{i:02d}.npz": epoch.to_bytes(8, "big") + blob for i in range(40)}
    store.save(0, epoch, payload, {"epochs": 10**9, "complete": False}, {"flavour": "test"})
    time.sleep(0.02)
"""


def test_a_trainer_saving_faster_than_an_upload_still_gets_whole_checkpoints_to_s3(
    s3: Any, tmp_path: Path
) -> None:
    """Each round uploads a hard-link snapshot of the latest save: newer saves pruning the
    folder meanwhile cannot starve S3 (before, every upload found its files gone)."""
    directory = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    saver = subprocess.Popen(
        [sys.executable, "-c", MANY_FILE_SAVER, str(directory)], env=env, stderr=subprocess.PIPE
    )
    uploaded: list[int] = []
    uploader = Uploader(
        str(directory),
        URL,
        on_event=lambda kind, info: uploaded.append(info["epoch"]) if kind == "uploaded" else None,
    )
    try:
        while not (directory / "manifest.json").exists():
            assert saver.poll() is None, saver.stderr.read() if saver.stderr else ""
            time.sleep(0.05)
        started = time.monotonic()
        while len(uploaded) < 3 and time.monotonic() - started < 15.0:
            uploader.round()
        newest = json.loads((directory / "manifest.json").read_text())["epoch"]
    finally:
        saver.kill()
        saver.wait()
    assert len(uploaded) >= 3, f"{len(uploaded)} upload(s) in 15 s of a trainer saving every 20 ms"
    assert newest - uploaded[0] >= 2  # the premise: saves came (and pruned) while it uploaded
    body = s3.get_object(Bucket=BUCKET, Key="team/job-20261128-120000-abcd/manifest.json")["Body"].read()
    manifest = json.loads(body)
    assert manifest["epoch"] == uploaded[-1]
    sizes = {
        k: o["Size"]
        for k, o in (
            (o["Key"][len("team/job-20261128-120000-abcd/") :], o)
            for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="team/")["Contents"]
        )
    }
    assert all(sizes.get(rel) == meta["size"] for rel, meta in manifest["files"].items())  # whole
    assert not list(tmp_path.glob(".s3-snapshot-*"))  # nothing held on the instance's disk
