"""`cloudtrain run --dry-run` end to end: simulated AWS, real SSH, real training, real teardown.

Each test drives the real command in a subprocess (so signals are real), then checks
the run folder, the ledger (through `status --json`) and the simulated AWS itself.
Lifecycle and signal tests train nothing: their `run:` is a plain Python command;
only the first test trains Keras.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudtrain.cloud.aws import TAG_RUN_ID, AwsCloud
from cloudtrain.cloud.simimage import ensure_image
from cloudtrain.cloud.simulator import ensure_simulator
from cloudtrain.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# The console script pip installed, as a user types it: `python -m cloudtrain` would import
# whatever `cloudtrain/` the current folder holds (the source tree, at a checkout's root).
CLOUDTRAIN = str(Path(sys.executable).parent / "cloudtrain")
EXAMPLE = REPO / "jobs" / "digits-mlp" / "job.yaml"


@pytest.fixture(scope="session")
def sim_image() -> Path:
    """The simulated image (built once per machine, cached; minutes the first time)."""
    return ensure_image()


def cloudtrain(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [CLOUDTRAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def logs_follower(run_id: str) -> subprocess.Popen[str]:
    """`cloudtrain logs RUN -f` in the background (``communicate()`` for its output)."""
    return subprocess.Popen(
        [CLOUDTRAIN, "logs", run_id, "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def status(run_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cloudtrain("status", run_id, "--json", check=True).stdout)
    return data


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def live_instances(settings: Settings, run_id: str) -> list[str]:
    """The run's instances that are not terminated, as the simulated AWS sees them."""
    cloud = AwsCloud(ensure_simulator(settings), "us-east-1")
    reply = cloud.ec2.describe_instances(Filters=[{"Name": f"tag:{TAG_RUN_ID}", "Values": [run_id]}])
    return [
        i["InstanceId"]
        for r in reply["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]


def write_job(folder: Path, run: str, *, outputs: str = "[outputs/]", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.txt").write_text("some input\n")
    job = {"name": "lifecycle", "run": run, "outputs": yaml.safe_load(outputs), "resources": {"gpu": "T4"}}
    (folder / "job.yaml").write_text(yaml.safe_dump(job) + extra)
    return folder / "job.yaml"


def py(code: str) -> str:
    """A shell command running ``code`` with the job environment's Python."""
    return f"python -c {shlex.quote(code)}"


# --- Keras, end to end ----------------------------------------------------------------


def test_example_job_trains_and_comes_home(sim_image: Path, tmp_path: Path, settings: Settings) -> None:
    out = tmp_path / "runs"
    done = cloudtrain("run", str(EXAMPLE), "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    run_dir = only_run(out)
    run_id = run_dir.name

    log = (run_dir / "logs" / "train.log").read_text()
    for epoch in range(1, 21):
        assert f"Epoch {epoch}/20" in log
    assert "test loss" in log
    assert "Epoch 20/20" in done.stdout  # streamed live to the user

    weights = run_dir / "outputs" / "outputs" / "model.weights.h5"
    predictions = run_dir / "outputs" / "outputs" / "predictions.csv"
    assert weights.is_file() and predictions.is_file()
    # The pulled weights load and predict what the run predicted.
    check = textwrap.dedent(f"""
        import numpy as np, sys
        sys.argv = ["train.py"]
        sys.path.insert(0, {str(EXAMPLE.parent)!r})
        from train import make_digits
        from keras import layers, models
        rng = np.random.default_rng(1234)
        prototypes = (rng.random((10, 64)) > 0.5).astype("float32")
        make_digits(4000, rng, prototypes); make_digits(1000, rng, prototypes)
        x_new, _ = make_digits(20, rng, prototypes)
        model = models.Sequential([layers.Input(shape=(64,)), layers.Dense(64, activation="relu"),
                                   layers.Dense(32, activation="relu"), layers.Dense(10, activation="softmax")])
        model.load_weights({str(weights)!r})
        print(",".join(str(int(c)) for c in model.predict(x_new, verbose=0).argmax(axis=1)))
    """)
    python = sim_image / "envs" / "tensorflow" / "bin" / "python"
    loaded = subprocess.run([str(python), "-c", check], capture_output=True, text=True, check=True)
    pulled = [line.split(",")[1] for line in predictions.read_text().splitlines()[1:]]
    assert loaded.stdout.strip().splitlines()[-1] == ",".join(pulled)

    record = status(run_id)
    assert record["state"] == "succeeded" and record["exit_code"] == 0 and record["simulated"] is True
    assert record["cost_usd"] > 0
    assert record["backend_report"]["backend"] == "tensorflow"
    assert record["instances"][0]["ended_at"] is not None
    assert live_instances(settings, run_id) == []
    assert json.loads((run_dir / "run.json").read_text())["id"] == run_id
    assert "name: digits-mlp" in (run_dir / "job.yaml").read_text()

    # the trainer's metrics: a line per epoch on stderr, metrics.csv, progress in status
    assert re.search(
        r"epoch 20/20: loss [0-9.e-]+, accuracy [0-9.]+, val_accuracy [0-9.]+, val_loss", done.stderr
    ), done.stderr
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("fit,epoch,epochs,epoch_s,at,loss,") and "val_accuracy" in rows[0]
    assert [row.split(",")[1] for row in rows[1:]] == [str(epoch) for epoch in range(1, 21)]
    progress = record["progress"]
    assert (progress["epoch"], progress["epochs"], progress["eta_s"]) == (20, 20, None)
    assert set(progress["metrics"]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}


# --- lifecycle with a plain Python command ----------------------------------------------


def test_failing_training_exits_1_with_its_log(sim_image: Path, tmp_path: Path, settings: Settings) -> None:
    job = write_job(tmp_path / "job", py("import sys; print('about to fail', flush=True); sys.exit(3)"))
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 1, done.stderr
    assert "the training command exited with code 3" in done.stderr
    run_dir = only_run(tmp_path / "runs")
    assert "about to fail" in (run_dir / "logs" / "train.log").read_text()
    record = status(run_dir.name)
    assert record["state"] == "failed" and record["exit_code"] == 3
    assert live_instances(settings, run_dir.name) == []


def test_host_key_mismatch_is_refused_and_terminated(
    sim_image: Path, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDTRAIN_SIM_FAULT", "host-key-mismatch")  # the simulator prints other keys
    job = write_job(tmp_path / "job", py("print('never runs')"))
    # --keep does not keep an instance that failed before training: it is terminated.
    done = cloudtrain("run", str(job), "--dry-run", "--keep", "--out", str(tmp_path / "runs"))
    assert done.returncode == 3, done.stderr
    assert "not one of the" in done.stderr and "fingerprints the instance printed" in done.stderr
    run_id = only_run(tmp_path / "runs").name
    assert live_instances(settings, run_id) == []
    assert any(e["kind"] == "host-key-mismatch" for e in status(run_id)["events"])


def leftovers(settings: Settings, run_id: str) -> list[str]:
    """What of the run the simulated AWS still has (instances not terminated, its security
    group, key pair, open or active spot requests), and its private key file."""
    ec2 = AwsCloud(ensure_simulator(settings), "us-east-1").ec2
    tagged = [{"Name": f"tag:{TAG_RUN_ID}", "Values": [run_id]}]
    left = [f"instance {i}" for i in live_instances(settings, run_id)]
    left += [f"group {g['GroupId']}" for g in ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]]
    left += [f"key pair {k['KeyName']}" for k in ec2.describe_key_pairs(Filters=tagged)["KeyPairs"]]
    requests = ec2.describe_spot_instance_requests(
        Filters=[*tagged, {"Name": "state", "Values": ["open", "active"]}]
    )["SpotInstanceRequests"]
    left += [f"spot request {r['SpotInstanceRequestId']}" for r in requests]
    if (settings.keys_dir / f"{run_id}.pem").exists():
        left.append("the private key file")
    return left


def run_until(
    job: Path, out: Path, marker: str, sig: int, *, watch: str = "stderr", debug: bool = False
) -> tuple[int, str, str]:
    """Start `run --dry-run`, send ``sig`` once ``watch`` (stderr, or stdout: the training log)
    shows ``marker``; return (code, stdout, stderr). ``debug``: `--debug` (INFO logs on stderr)."""
    process = subprocess.Popen(
        [
            CLOUDTRAIN,
            *(["--debug"] if debug else []),
            "run",
            str(job),
            "--dry-run",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert process.stderr is not None and process.stdout is not None
    watched = process.stderr if watch == "stderr" else process.stdout
    seen = []
    deadline = time.monotonic() + 300
    for line in watched:
        seen.append(line)
        if marker in line:
            process.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen)
    try:
        stdout, rest = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # stuck: have it print every thread's stack, then fail with them
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        process.kill()
        stdout, rest = process.communicate()
        pytest.fail(f"still running 300 s after the signal:\n{''.join(seen)}{stdout}{rest}")
    if watch == "stdout":
        return process.returncode, "".join(seen) + stdout, rest
    return process.returncode, stdout, "".join(seen) + rest


LOOP = "import time\nfor i in range(600): print(i, flush=True); time.sleep(0.1)"


@pytest.mark.parametrize(
    ("phase", "marker", "watch"),
    [
        ("launching", "▸ launching", "stderr"),  # key pair, image, group
        # --debug logs the RunInstances call as it goes out: the signal lands while it is in
        # flight (tests/test_hardening.py slows the call down to hit it every time)
        ("launch-in-flight", "RunInstances for", "debug"),
        ("boot", "▸ provisioning", "stderr"),  # waiting for the host key fingerprints, then the backend
        ("syncing", "▸ syncing", "stderr"),
        ("setup", "setting-up", "stdout"),  # the job's `setup:`, before its `run:`
        ("running", "▸ running", "stderr"),
        ("pulling", "▸ pulling", "stderr"),
    ],
)
def test_ctrl_c_in_each_phase_leaves_nothing_running(
    sim_image: Path, tmp_path: Path, settings: Settings, phase: str, marker: str, watch: str
) -> None:
    extra = ""
    if phase == "pulling":  # a quick run with 64 MB of outputs: the signal lands mid-pull
        program = "import os\nos.makedirs('outputs', exist_ok=True)\nopen('outputs/big.bin', 'wb').write(os.urandom(64 << 20))"
    elif phase == "setup":
        program = "print('never runs')"
        extra = yaml.safe_dump({"setup": py(LOOP.replace("print(i,", "print('setting-up', i,"))})
    else:
        program = LOOP
    job = write_job(tmp_path / "job", py(program), extra=extra)
    code, stdout, stderr = run_until(
        job,
        tmp_path / "runs",
        marker,
        signal.SIGINT,
        watch="stderr" if watch == "debug" else watch,
        debug=watch == "debug",
    )
    assert code == 130, stderr
    run_id = only_run(tmp_path / "runs").name
    assert leftovers(settings, run_id) == [], stderr
    assert status(run_id)["state"] == "cancelled"
    if phase == "setup":
        assert "never runs" not in stdout + (tmp_path / "runs" / run_id / "logs" / "train.log").read_text()


def test_a_stuck_pull_after_ctrl_c_does_not_hold_up_teardown(
    sim_image: Path, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The training replaces the agent's pack module with one that never answers, so
    # pulling back after Ctrl-C hangs: teardown must go ahead after the salvage bound.
    program = (
        "import os, time\n"
        "pack = os.path.expanduser('~/.cloudtrain/agent/cloudtrain_agent/pack.py')\n"
        "open(pack, 'w').write('import time\\ntime.sleep(3600)\\n')\n"
        "print('pack-hung', flush=True)\n"
        "for i in range(600): print(i, flush=True); time.sleep(0.1)"
    )
    monkeypatch.setenv("CLOUDTRAIN_SALVAGE_PULL_S", "5")
    job = write_job(tmp_path / "job", py(program))
    started = time.monotonic()
    code, _, stderr = run_until(job, tmp_path / "runs", "pack-hung", signal.SIGINT, watch="stdout")
    assert code == 130, stderr
    assert "pulling back took over 5 s: gave up on it" in stderr
    assert time.monotonic() - started < 120
    run_id = only_run(tmp_path / "runs").name
    assert live_instances(settings, run_id) == []
    record = status(run_id)
    assert record["state"] == "cancelled"
    assert any(e["kind"] == "salvage-timeout" for e in record["events"])


def test_sigterm_like_sigint(sim_image: Path, tmp_path: Path, settings: Settings) -> None:
    job = write_job(
        tmp_path / "job", py("import time\nfor i in range(600): print(i, flush=True); time.sleep(0.1)")
    )
    code, _, stderr = run_until(job, tmp_path / "runs", "▸ running", signal.SIGTERM)
    assert code == 143, stderr
    run_id = only_run(tmp_path / "runs").name
    assert leftovers(settings, run_id) == []
    assert status(run_id)["state"] == "cancelled"


def test_detach_then_pull_and_attach(
    sim_image: Path, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = (
        "import os, time\nos.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/early.txt', 'w').write('early')\n"
        "for i in range(80): print('step', i, os.environ['TRAIN_TOKEN'], flush=True); time.sleep(0.1)\n"
        "open('outputs/final.txt', 'w').write('final')\nprint('finished', flush=True)"
    )
    job = write_job(tmp_path / "job", py(code), extra="secrets: [TRAIN_TOKEN]\n")
    token = "s3cr3t-for-the-run"
    monkeypatch.setenv("TRAIN_TOKEN", token)
    done = cloudtrain("run", str(job), "--dry-run", "--detach", "--out", str(tmp_path / "runs"), check=True)
    assert "detached" in done.stderr
    run_dir = only_run(tmp_path / "runs")
    run_id = run_dir.name
    assert status(run_id)["state"] == "running"
    assert len(live_instances(settings, run_id)) == 1

    early = run_dir / "outputs" / "outputs" / "early.txt"
    for _ in range(20):  # the training writes it as soon as it starts
        cloudtrain("pull", run_id[:-2], check=True)  # a unique prefix is enough
        if early.exists():
            break
        time.sleep(0.5)
    assert early.read_text() == "early"
    assert status(run_id)["state"] == "running"  # pull leaves the instance running

    # The secret is read from this environment by whatever follows the run, and masked
    # in what it shows and keeps; `attach`, which may relaunch the run, needs it.
    follower = logs_follower(run_id)
    monkeypatch.delenv("TRAIN_TOKEN")
    refused = cloudtrain("attach", run_id)
    assert (
        refused.returncode == 2 and "secrets are not set in this environment: TRAIN_TOKEN" in refused.stderr
    )
    monkeypatch.setenv("TRAIN_TOKEN", token)
    attached = cloudtrain("attach", run_id, check=True)
    followed, _ = follower.communicate(timeout=120)
    masked = "*" * len(token)
    assert f"step 79 {masked}" in attached.stdout  # the rest of the log, streamed
    assert f"step 79 {masked}" in followed and f"step 0 {masked}" in followed
    assert (run_dir / "outputs" / "outputs" / "final.txt").read_text() == "final"
    log = (run_dir / "logs" / "train.log").read_text()
    assert all(f"step {i} {masked}\n" in log for i in range(80)) and "finished" in log
    assert token not in log + attached.stdout + followed
    assert status(run_id)["state"] == "succeeded"
    assert live_instances(settings, run_id) == []


def test_logs_follow_waits_for_a_run_that_has_not_started_training(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    job = write_job(
        tmp_path / "job", py("import time\nfor i in range(20): print('step', i, flush=True); time.sleep(0.1)")
    )
    out = tmp_path / "runs"
    controller = subprocess.Popen(
        [CLOUDTRAIN, "run", str(job), "--dry-run", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(out.iterdir())):  # the run is recorded, not yet training
            assert time.monotonic() < deadline and controller.poll() is None
            time.sleep(0.05)
        run_id = only_run(out).name
        assert status(run_id)["state"] in ("planned", "launching", "provisioning", "syncing")
        follower = cloudtrain("logs", run_id, "-f", timeout=300)
        assert follower.returncode == 0, follower.stderr
        assert f"waiting for {run_id} to start training" in follower.stderr
        assert all(f"step {i}\n" in follower.stdout for i in range(20))
    finally:
        assert controller.wait(timeout=300) == 0


def test_ctrl_c_as_the_run_is_recorded_does_not_leave_it_planned(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    from cloudtrain.api import run_job

    def interrupt(run_id: str) -> None:
        raise KeyboardInterrupt

    job = write_job(tmp_path / "job", py("print('never runs')"))
    with pytest.raises(KeyboardInterrupt):
        run_job(job, settings, dry_run=True, out_dir=tmp_path / "runs", on_run_id=interrupt)
    run_id = only_run(tmp_path / "runs").name
    record = status(run_id)
    assert record["state"] == "cancelled" and record["instances"] == []
    assert live_instances(settings, run_id) == []


def test_keep_then_down(sim_image: Path, tmp_path: Path, settings: Settings) -> None:
    job = write_job(tmp_path / "job", py("print('ok')"), extra="budget: {max_hours: 2}\n")
    done = cloudtrain("run", str(job), "--dry-run", "--keep", "--out", str(tmp_path / "runs"), check=True)
    assert "--keep:" in done.stderr
    run_id = only_run(tmp_path / "runs").name
    record = status(run_id)
    assert record["state"] == "succeeded" and record["kept_until"]
    assert len(live_instances(settings, run_id)) == 1
    cloudtrain("down", "--all", check=True)  # a kept run is among what --all stops
    assert live_instances(settings, run_id) == []
    assert status(run_id)["kept_until"] is None


def test_kept_instance_powers_itself_off_at_the_deadline(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    job = write_job(tmp_path / "job", py("print('ok')"), extra="budget: {max_hours: 0.005}\n")  # 18 s
    cloudtrain("run", str(job), "--dry-run", "--keep", "--out", str(tmp_path / "runs"), check=True)
    run_id = only_run(tmp_path / "runs").name
    assert len(live_instances(settings, run_id)) == 1  # kept: the deadline is 18 s after the start
    for _ in range(120):
        if not live_instances(settings, run_id):
            break
        time.sleep(0.5)
    assert live_instances(settings, run_id) == []


def test_secrets_reach_the_run_only(
    sim_image: Path, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's secret reaches the training's environment and nothing else; the user's AWS
    keys reach nothing on the instance (its S3 data comes through the instance profile).

    In-process, so that everything sent to the simulated host is seen: each SSH channel's
    command and bytes (the OpenSSH client is off: all of it goes through paramiko) and
    each RunInstances call; then what is on the host and in the run folder."""
    import gzip

    import paramiko

    from cloudtrain.api import run_job
    from cloudtrain.cloud.aws import make_client
    from cloudtrain.progress import Reporter
    from cloudtrain.remote.sync import OpenSSH

    token, user_keys = b"s3cr3t-value", [b"fake-secret-never-leaves-this-machine", b"AKIAFAKEFAKEFAKEFAKE"]
    monkeypatch.setenv("TRAIN_TOKEN", token.decode())
    sim = ensure_simulator(settings, image=sim_image)
    s3 = make_client(sim, "s3", "us-east-1")
    s3.create_bucket(Bucket="job-bucket")
    s3.put_object(Bucket="job-bucket", Key="set/a.txt", Body=b"content of a")

    sent: list[tuple[str, bytearray]] = []  # (command, the bytes sent on its channel)
    channels: dict[int, bytearray] = {}
    launches: list[dict[str, Any]] = []
    exec_command, send, run_instances = (
        paramiko.Channel.exec_command,
        paramiko.Channel.send,
        AwsCloud._run_instances,
    )

    def recording_exec(channel: paramiko.Channel, command: str | bytes) -> None:
        sent.append((command if isinstance(command, str) else command.decode(), bytearray()))
        channels[id(channel)] = sent[-1][1]
        exec_command(channel, command)

    def recording_send(channel: paramiko.Channel, data: bytes) -> int:
        n: int = send(channel, data)
        channels.setdefault(id(channel), bytearray()).extend(bytes(data[:n]))
        return n

    def recording_launch(cloud: AwsCloud, params: dict[str, Any]) -> Any:
        launches.append(params)
        return run_instances(cloud, params)

    monkeypatch.setattr(paramiko.Channel, "exec_command", recording_exec)
    monkeypatch.setattr(paramiko.Channel, "send", recording_send)
    monkeypatch.setattr(AwsCloud, "_run_instances", recording_launch)
    monkeypatch.setattr(OpenSSH, "available", staticmethod(lambda: False))

    class Log(Reporter):
        def __init__(self) -> None:
            self.text = bytearray()

        def log(self, data: bytes) -> None:
            self.text += data

    program = (
        "import os\n"
        "print('token length', len(os.environ['TRAIN_TOKEN']), flush=True)\n"
        "print('A=' + open('data/set/a.txt').read(), flush=True)\n"
        "print('env', sorted((k, v) for k, v in os.environ.items() if k != 'TRAIN_TOKEN'), flush=True)\n"
        "print('careless', os.environ['TRAIN_TOKEN'], 'end', flush=True)\n"  # a job that prints it
    )
    job = write_job(
        tmp_path / "job",
        py(program),
        extra="secrets: [TRAIN_TOKEN]\ndata: [{src: 's3://job-bucket/set/', dst: data/set}]\n",
    )
    reporter = Log()
    outcome = run_job(job, settings, dry_run=True, out_dir=tmp_path / "runs", reporter=reporter)
    assert outcome.exit_code == 0

    log = bytes(reporter.text)
    assert b"token length 12" in log and b"A=content of a" in log
    assert token not in log and not [k for k in user_keys if k in log]
    assert b"careless " + b"*" * len(token) + b" end" in log  # printed by the job: masked on its way home

    assert len(sent) > 10 and launches
    opened = [
        (command, gzip.decompress(data) if data[:2] == b"\x1f\x8b" else bytes(data)) for command, data in sent
    ]
    for command, data in opened:
        assert token.decode() not in command and not [k for k in user_keys if k.decode() in command], command
        assert not [k for k in user_keys if k in data], command
    (start,) = [command for command, data in opened if token in data]  # once: `start`'s stdin
    assert " start " in start
    assert not [k for k in user_keys if k.decode() in json.dumps(launches, default=str)]

    run_dir = only_run(tmp_path / "runs")
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert token not in path.read_bytes(), path
    sandbox = Path(os.environ["CLOUDTRAIN_HOME"]) / "sim" / "instances"
    checked = 0
    for path in sandbox.rglob("*"):
        if path.is_file() and path.stat().st_size < 1_000_000 and "envs" not in path.parts:
            data = path.read_bytes()
            if path.name == "train.log":  # what the job printed, on the instance (terminated)
                data = data.replace(b"careless " + token, b"")
            assert token not in data and not [k for k in user_keys if k in data], path
            checked += 1
    assert checked > 10


def test_missing_secret_refused_before_launch(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", py("print(1)"), extra="secrets: [NOT_SET_ANYWHERE]\n")
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 2
    assert "NOT_SET_ANYWHERE" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_real_run_without_terminal_refuses_to_spend(tmp_path: Path) -> None:
    done = cloudtrain("run", str(EXAMPLE))
    assert done.returncode == 2
    assert "refusing to spend money without a terminal" in done.stderr
