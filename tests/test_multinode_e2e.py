"""A run on several nodes end to end in `--dry-run` (#17): the example job's
MultiWorkerMirroredStrategy (`keras: 2`) on two simulated hosts, each on its own loopback
address, launched together in one placement group; TF_CONFIG names them; both workers end
with the same weights; the chief's outputs come home, each node's log too; the whole
group is relaunched when one node is lost, and resumes from the chief's checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_run_e2e import cloudtrain, live_instances, only_run, py, sim_image, status  # noqa: F401

from cloudtrain.cloud.aws import AwsCloud
from cloudtrain.cloud.simulator import ensure_simulator
from cloudtrain.settings import Settings

REPO = Path(__file__).resolve().parents[1]
MULTIWORKER_JOB = REPO / "jobs" / "digits-multiworker"
SHOW_CLUSTER = (
    'python -c \'import os; print("TF_CONFIG=" + os.environ["TF_CONFIG"]); '
    'print("NODE_ADDRS=" + os.environ["CLOUDTRAIN_NODE_ADDRS"])\''
)


def multiworker_job(folder: Path, epochs: int) -> Path:
    """The example job (its workdir kept), printing its cluster variables first."""
    job = yaml.safe_load((MULTIWORKER_JOB / "job.yaml").read_text())
    job.update(workdir=str(MULTIWORKER_JOB), run=f"{SHOW_CLUSTER} && python train.py --epochs {epochs}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"


def digests(log: str) -> list[tuple[int, str]]:
    """The (node, weights sha256) lines the example prints at its end, in order."""
    return [(int(m[1]), m[2]) for m in re.finditer(r"node (\d+) weights sha256 ([0-9a-f]{64})", log)]


def run_resources(settings: Settings, run_id: str) -> list[str]:
    """What of the run is still in the simulated AWS (instances, groups, key pairs ...)."""
    cloud = AwsCloud(ensure_simulator(settings), "us-east-1")
    return [f"{r.kind} {r.id}" for r in cloud.owned_resources(settings.owner, run_id)]


def test_two_nodes_train_in_step_and_the_chief_brings_the_outputs_home(
    sim_image: Path,  # noqa: F811
    tmp_path: Path,
    settings: Settings,
) -> None:
    job = multiworker_job(tmp_path / "job", epochs=3)
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = only_run(tmp_path / "runs")
    record = status(run_dir.name)
    instances = record["instances"]
    assert [i["type"] for i in instances] == ["g4dn.xlarge", "g4dn.xlarge"]
    assert len({i["zone"] for i in instances}) == 1  # launched together, in one zone

    chief = (run_dir / "logs" / "train.log").read_text()
    worker = (run_dir / "logs" / "node-1.log").read_text()
    config = json.loads(re.search(r"^TF_CONFIG=(.*)", chief, re.M)[1])  # type: ignore[index]
    addresses = [w.rsplit(":", 1)[0] for w in config["cluster"]["worker"]]
    assert config["task"] == {"type": "worker", "index": 0}
    assert len(set(addresses)) == 2 and all(re.fullmatch(r"127\.0\.0\.\d+", a) for a in addresses)
    assert f"NODE_ADDRS={','.join(addresses)}" in chief
    assert json.loads(re.search(r"^TF_CONFIG=(.*)", worker, re.M)[1])["task"]["index"] == 1  # type: ignore[index]
    assert "MultiWorkerMirroredStrategy: node 0 of 2, 2 replicas" in chief
    assert "MultiWorkerMirroredStrategy: node 1 of 2, 2 replicas" in worker
    ((node0, digest0),) = digests(chief)
    ((node1, digest1),) = digests(worker)
    assert (node0, node1) == (0, 1) and digest0 == digest1  # the all-reduce kept them in step

    outputs = run_dir / "outputs" / "outputs"
    assert (outputs / "model.weights.h5").is_file()
    assert len((outputs / "predictions.csv").read_text().splitlines()) == 1 + 20
    assert not (run_dir / "outputs" / "scratch").exists()  # the worker's are not the run's outputs

    assert live_instances(settings, run_dir.name) == []
    assert run_resources(settings, run_dir.name) == []  # placement group and all
    report = json.loads(cloudtrain("cost-report", "--json", check=True).stdout)
    (row,) = [r for r in report["rows"] if r["key"] == run_dir.name]
    assert row["instances"] == 2


def test_losing_a_worker_relaunches_the_group_from_the_chiefs_checkpoint(
    sim_image: Path,  # noqa: F811
    tmp_path: Path,
    settings: Settings,
) -> None:
    job = multiworker_job(tmp_path / "job", epochs=6)
    done = cloudtrain(
        "run",
        str(job),
        "--dry-run",
        "--out",
        str(tmp_path / "runs"),
        "--simulate-interruption",
        "node1:epoch:4:no-notice",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = only_run(tmp_path / "runs")
    record = status(run_dir.name)
    assert len(record["instances"]) == 4  # two, then two again
    kinds = [e["kind"] for e in record["events"]]
    assert "interrupted" in kinds and "restore" in kinds
    lost = [e["message"] for e in record["events"] if e["kind"] == "interrupted"]
    assert record["instances"][1]["id"] in lost[0]  # node 1 was the one taken
    chief = (run_dir / "logs" / "train.log").read_text()
    worker = (run_dir / "logs" / "node-1.log").read_text()
    resumed = chief[chief.rindex("\nTF_CONFIG=") :]
    assert "Epoch 6/6" in resumed and "Epoch 1/6" not in resumed  # it went on from a checkpoint
    assert digests(chief)[-1][1] == digests(worker)[-1][1]
    assert (run_dir / "outputs" / "outputs" / "model.weights.h5").is_file()
    assert all(i["ended_at"] for i in record["instances"])  # billed no longer, all four
    assert run_resources(settings, run_dir.name) == []  # both launches' placement groups too


def two_nodes(folder: Path, run: str) -> Path:
    """A `keras: 2` job on two nodes running ``run`` (a stand-in for training)."""
    folder.mkdir(parents=True, exist_ok=True)
    job = {
        "name": "pair",
        "keras": 2,
        "run": run,
        "outputs": ["outputs/"],
        "resources": {"gpu": "T4", "nodes": 2},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"


def test_a_failing_worker_fails_the_run_and_is_named(
    sim_image: Path,  # noqa: F811
    tmp_path: Path,
    settings: Settings,
) -> None:
    # Node 1 fails while the chief would go on for minutes (as one waiting on a collective
    # step would): the run stops at once, names the node and its last line, exits 1.
    failing = py(
        "import os, sys, time\n"
        "if os.environ['CLOUDTRAIN_NODE_RANK'] == '1':\n"
        "    time.sleep(1); print('bad shard: no such file', file=sys.stderr); sys.exit(3)\n"
        "print('chief waiting', flush=True); time.sleep(600)"
    )
    done = cloudtrain(
        "run", str(two_nodes(tmp_path / "job", failing)), "--dry-run", "--out", str(tmp_path / "runs")
    )
    assert done.returncode == 1, done.stderr[-4000:]
    assert "the training command of node 1 exited with code 3" in done.stderr
    assert "bad shard: no such file" in done.stderr  # its last line, surfaced
    run_dir = only_run(tmp_path / "runs")
    assert "bad shard: no such file" in (run_dir / "logs" / "node-1.log").read_text()
    assert "chief waiting" in (run_dir / "logs" / "train.log").read_text()
    record = status(run_dir.name)
    assert record["state"] == "failed" and "node-failed" in [e["kind"] for e in record["events"]]
    assert live_instances(settings, run_dir.name) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--keep"], "--keep and --detach are for runs on one node"),
        (["--detach"], "--keep and --detach are for runs on one node"),
        (["--simulate-interruption", "node2:epoch:1"], "the job has 2 nodes"),
    ],
)
def test_what_a_run_on_several_nodes_cannot_do_is_refused_first(
    tmp_path: Path, options: list[str], message: str
) -> None:
    job = two_nodes(tmp_path / "job", "true")
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"), *options)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"keras": 3}, "keras-team/keras#20585"),
        ({"backend": "theano", "keras": None}, "backend: theano"),
    ],
)
def test_a_job_that_cannot_train_on_several_nodes_is_refused_before_launch(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    job = yaml.safe_load((MULTIWORKER_JOB / "job.yaml").read_text())
    job.update(workdir=str(MULTIWORKER_JOB))
    job.update({k: v for k, v in changes.items() if v is not None})
    for key in (k for k, v in changes.items() if v is None):
        job.pop(key)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    done = cloudtrain("run", str(tmp_path / "job.yaml"), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "resources.nodes" in done.stderr
    assert not (tmp_path / "runs").exists()
