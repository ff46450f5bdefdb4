"""Both Keras backends end to end in `--dry-run`: Theano (Keras 2.3.1, Python 3.7), Keras 2
on TensorFlow (tf-keras), the backend check before training, and `seed:` reproducibility.

Theano needs a Python 3.7 for the simulated image: where none is found the Theano tests
skip and say what to install, except in CI (CI=true), where they must run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import needs
import pytest
import yaml
from test_run_e2e import cloudtrain, live_instances, only_run, sim_image, status  # noqa: F401  (fixture)

from cloudtrain.cloud import simimage
from cloudtrain.settings import Settings

REPO = Path(__file__).resolve().parents[1]
THEANO_JOB = REPO / "jobs" / "digits-theano"
TF_JOB = REPO / "jobs" / "digits-mlp"
MIRRORED_JOB = REPO / "jobs" / "digits-mirrored"


@pytest.fixture(scope="session")
def theano_image() -> Path:
    """The simulated image with its theano environment (built once per machine, cached)."""
    needs.python37()  # the theano environment's Python
    return simimage.ensure_image(("tensorflow", "theano"))


def job_copy(folder: Path, source: Path, **changes: object) -> Path:
    """The example job at ``source``, its workdir kept, with ``changes`` to its keys."""
    job = yaml.safe_load((source / "job.yaml").read_text())
    job.update(workdir=str(source), **changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"


def run_ok(job: Path, out: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return only_run(out), done


def weights(python: Path, path: Path, env: dict[str, str] | None = None) -> list[str]:
    """Every array in a weights file, as hex of its bytes, in h5 order (bitwise comparison)."""
    code = textwrap.dedent("""
        import sys, h5py, numpy as np
        found = []
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                found.append(name + "=" + np.ascontiguousarray(obj[()]).tobytes().hex())
        with h5py.File(sys.argv[1], "r") as f:
            f.visititems(visit)
        print("\\n".join(found))
    """)
    done = subprocess.run(
        [str(python), "-c", code, str(path)], capture_output=True, text=True, check=True, env=env
    )
    arrays = done.stdout.split()
    assert arrays, f"no arrays in {path}"
    return arrays


# --- the image: what its locks say, nothing else ----------------------------------------------


def installed(python: Path) -> dict[str, str]:
    """Every distribution in an environment, by canonical name: its version."""
    from packaging.utils import canonicalize_name

    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed)}


@pytest.mark.parametrize(
    ("env", "locks", "image"),
    [
        ("tensorflow", ("lock-tensorflow-cpu.txt", "lock-tf-keras.txt"), "sim_image"),
        ("theano", ("lock-theano.txt",), "theano_image"),  # needs a Python 3.7
    ],
)
def test_the_simulated_image_holds_exactly_its_locks(
    request: pytest.FixtureRequest, env: str, locks: tuple[str, ...], image: str
) -> None:
    from test_locks import entries

    locked = {name: version for lock in locks for name, (version, _) in entries(lock).items()}
    found = installed(request.getfixturevalue(image) / "envs" / env / "bin" / "python")
    assert {name: found.get(name) for name in locked} == locked
    # Beyond the locks: only what the venv itself brings (pip, and setuptools on Python 3.7).
    assert set(found) - set(locked) <= {"pip", "setuptools"}


# --- Theano ----------------------------------------------------------------------------------


def test_theano_job_trains_and_comes_home(theano_image: Path, tmp_path: Path, settings: Settings) -> None:
    run_dir, done = run_ok(THEANO_JOB / "job.yaml", tmp_path / "runs")
    assert "backend verified: Keras 2.3.1 on theano 1.0.5 (theano), device: cpu" in done.stderr
    log = (run_dir / "logs" / "train.log").read_text()
    assert all(f"Epoch {epoch}/10" in log for epoch in range(1, 11))
    assert "Epoch 10/10" in done.stdout  # streamed live

    record = status(run_dir.name)
    report = record["backend_report"]
    assert record["state"] == "succeeded" and record["backend"] == "theano"
    assert report["backend"] == "theano" and report["keras_version"] == "2.3.1"
    assert report["framework"] == "theano" and report["framework_version"] == "1.0.5"
    assert report["python"].startswith("3.7.") and report["devices"] == ["cpu"] and report["gpu"] is False
    assert report["ok"] is True and report["expected_keras"] == 2
    assert live_instances(settings, run_dir.name) == []
    assert "epoch 10/10: loss" in done.stderr  # Keras 2.3.1's fit hook records its metrics too
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 10
    assert record["progress"]["epoch"] == 10

    # The pulled weights load in the same stack and predict what the run predicted.
    outputs = run_dir / "outputs" / "outputs"
    compiledir = tmp_path / "theano-compile"
    shutil.copytree(theano_image / "theano-cache", compiledir)
    check = textwrap.dedent(f"""
        import sys
        sys.argv = ["train.py"]
        sys.path.insert(0, {str(THEANO_JOB)!r})
        import numpy as np
        from train import make_digits
        from keras.layers import Dense, Dropout
        from keras.models import Sequential
        rng = np.random.RandomState(1234)
        prototypes = (rng.rand(10, 64) > 0.5).astype("float32")
        make_digits(4000, rng, prototypes); make_digits(1000, rng, prototypes)
        x_new, _ = make_digits(20, rng, prototypes)
        model = Sequential([Dense(64, input_dim=64, activation="relu"), Dropout(0.2),
                            Dense(32, activation="relu"), Dense(10, activation="softmax")])
        model.load_weights({str(outputs / "model.h5")!r})
        print(",".join(str(int(c)) for c in model.predict(x_new).argmax(axis=1)))
    """)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "KERAS_BACKEND": "theano",
        "THEANO_FLAGS": f"device=cpu,floatX=float32,base_compiledir={compiledir}",
    }
    python = theano_image / "envs" / "theano" / "bin" / "python"
    loaded = subprocess.run([str(python), "-c", check], capture_output=True, text=True, env=env)
    assert loaded.returncode == 0, loaded.stderr
    pulled = [line.split(",")[1] for line in (outputs / "predictions.csv").read_text().splitlines()[1:]]
    assert loaded.stdout.strip().splitlines()[-1] == ",".join(pulled)


def test_theano_seed_gives_identical_weights_and_predictions(theano_image: Path, tmp_path: Path) -> None:
    job = job_copy(tmp_path / "job", THEANO_JOB, run="python train.py --epochs 2", seed=7)
    runs = [run_ok(job, tmp_path / f"runs{i}")[0] / "outputs" / "outputs" for i in range(2)]
    python = theano_image / "envs" / "theano" / "bin" / "python"
    first, second = (weights(python, r / "model.h5") for r in runs)
    assert first == second
    assert (runs[0] / "predictions.csv").read_bytes() == (runs[1] / "predictions.csv").read_bytes()


# --- TensorFlow ------------------------------------------------------------------------------


def test_tensorflow_seed_gives_identical_weights_and_another_seed_does_not(
    sim_image: Path, tmp_path: Path
) -> None:
    def train(seed: int, name: str) -> Path:
        job = job_copy(tmp_path / name, TF_JOB, run="python train.py --epochs 3", seed=seed)
        return run_ok(job, tmp_path / f"runs-{name}")[0] / "outputs" / "outputs"

    a, b, other = train(42, "a"), train(42, "b"), train(7, "c")
    python = sim_image / "envs" / "tensorflow" / "bin" / "python"
    arrays = {
        name: weights(python, run / "model.weights.h5") for name, run in (("a", a), ("b", b), ("c", other))
    }
    assert arrays["a"] == arrays["b"]
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    assert arrays["a"] != arrays["c"]  # the seed is what makes them equal


def test_keras_2_script_runs_on_tensorflow_through_tf_keras(sim_image: Path, tmp_path: Path) -> None:
    # The Keras 2 script (input_dim=, save_weights('model.h5')) as written for Theano.
    job = job_copy(
        tmp_path / "job",
        THEANO_JOB,
        name="digits-keras2",
        backend="tensorflow",
        keras=2,
        run="python train.py --epochs 2",
    )
    run_dir, done = run_ok(job, tmp_path / "runs")
    report = status(run_dir.name)["backend_report"]
    assert report["backend"] == "tensorflow" and report["keras_version"].startswith("2.")
    assert report["expected_keras"] == 2 and report["tf_keras_version"] == report["keras_version"]
    assert f"backend verified: Keras {report['keras_version']} on tensorflow" in done.stderr
    outputs = run_dir / "outputs" / "outputs"
    assert weights(sim_image / "envs" / "tensorflow" / "bin" / "python", outputs / "model.h5")
    assert "test loss" in (run_dir / "logs" / "train.log").read_text()


def test_the_same_script_fails_on_keras_3(sim_image: Path, tmp_path: Path) -> None:
    # Why `keras: 2` exists: Keras 3 refuses the seed-era save_weights('model.h5').
    python = sim_image / "envs" / "tensorflow" / "bin" / "python"
    done = subprocess.run(
        [str(python), str(THEANO_JOB / "train.py"), "--epochs", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KERAS_BACKEND": "tensorflow"},
    )
    assert done.returncode != 0 and ".weights.h5" in done.stderr


# --- several GPUs: MirroredStrategy ----------------------------------------------------------


def test_the_mirrored_example_trains_one_replica_per_gpu_of_its_type(sim_image: Path, tmp_path: Path) -> None:
    # Under `keras: 2` too: test_checkpoint.py's MirroredStrategy test trains tf-keras so.
    job = job_copy(tmp_path / "job", MIRRORED_JOB, run="python train.py --epochs 2")
    run_dir, done = run_ok(job, tmp_path / "runs")
    record = status(run_dir.name)
    assert [i["type"] for i in record["instances"]] == ["g4dn.12xlarge"]  # gpu: T4:4: four replicas
    log = (run_dir / "logs" / "train.log").read_text()
    assert "MirroredStrategy: 4 replicas (CPU:0, CPU:1, CPU:2, CPU:3)" in log
    assert "Keras 3." in log and "Epoch 2/2" in log
    outputs = run_dir / "outputs" / "outputs"
    assert len((outputs / "predictions.csv").read_text().splitlines()) == 1 + 20
    assert weights(sim_image / "envs" / "tensorflow" / "bin" / "python", outputs / "model.weights.h5")


# --- the backend check -----------------------------------------------------------------------


def test_backend_mismatch_fails_before_sync(sim_image: Path, tmp_path: Path, settings: Settings) -> None:
    # The job's PYTHONPATH shadows keras with one that reports Theano: verification refuses
    # it before anything is synced or trained, and the instance is terminated.
    shadow = tmp_path / "shadow" / "keras"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("__version__ = '3.0.0'\nfrom . import backend\n")
    (shadow / "backend.py").write_text("def backend():\n    return 'theano'\n")
    job = job_copy(tmp_path / "job", TF_JOB, env={"PYTHONPATH": str(shadow.parent)})
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 3, done.stderr
    assert "Keras uses the 'theano' backend, but the job wants 'tensorflow'" in done.stderr
    run_id = only_run(tmp_path / "runs").name
    record = status(run_id)
    kinds = [e["kind"] for e in record["events"]]
    assert "provisioning" in kinds and "syncing" not in kinds and "running" not in kinds
    assert record["state"] == "failed" and live_instances(settings, run_id) == []
