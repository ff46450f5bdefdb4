"""Checkpoint and resume of unchanged seed-style Keras scripts (cloudtrain/agent/checkpoint.py),
with real training in the simulated image's environments: Keras 3 and tf_keras on TensorFlow,
Keras 2.3.1 on Theano under Python 3.7.

The trainer is killed with SIGKILL at chosen points by CLOUDTRAIN_CHECKPOINT_TEST_KILL (test
only: the checkpoint writer kills its own process). Theano needs a Python 3.7: where none is
found its tests skip and say what to install, except in CI (CI=true), where they must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_backends_e2e import theano_image  # noqa: F401  (fixture)

from cloudtrain import metrics
from cloudtrain.agent import checkpoint
from cloudtrain.agent.backend import configure
from cloudtrain.cloud import simimage

# Seed-style Keras 3: Input, Dense, Dropout, compile, fit. Saves every weight as one .npy.
KERAS3_SCRIPT = """\
import sys
import numpy as np
import keras
from keras import layers

epochs, out, width = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = np.random.RandomState(0)
x = rng.rand(256, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("int32")
model = keras.Sequential([
    layers.Input(shape=(8,)),
    layers.Dense(width, activation="relu"),
    layers.Dropout(0.3),
    layers.Dense(2, activation="softmax"),
])
model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=epochs, batch_size=32, verbose=2)
np.save(out, np.concatenate([w.ravel() for w in model.get_weights()]))
"""

# Seed-style Keras 2 (tf_keras through `keras: 2`, or Keras 2.3.1 on Theano): two models, two
# fits (checkpoints belong to the fit by call order), input_dim=, SGD(learning_rate=...).
KERAS2_SCRIPT = """\
import sys
import numpy as np
from keras.layers import Dense, Dropout
from keras.models import Sequential
from keras.optimizers import SGD

epochs, out = [int(e) for e in sys.argv[1].split(",")], sys.argv[2]
rng = np.random.RandomState(0)
x = rng.rand(256, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("int32")
weights = []
for width, n in zip((8, 12), epochs):
    model = Sequential()
    model.add(Dense(width, input_dim=8, activation="relu"))
    model.add(Dropout(0.3))
    model.add(Dense(2, activation="softmax"))
    model.compile(optimizer=SGD(learning_rate=0.05, momentum=0.9), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=n, batch_size=32, verbose=2)
    weights.extend(w.ravel() for w in model.get_weights())
np.save(out, np.concatenate(weights))
"""

# Keras 3 or tf_keras under tf.distribute.MirroredStrategy, two replicas on two logical CPUs:
# the optimizer's variables are mirrored, and must be created in the strategy's scope.
MIRRORED_SCRIPT = """\
import sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
import keras

epochs, out = int(sys.argv[1]), sys.argv[2]
rng = np.random.RandomState(0)
x = rng.rand(256, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("int32")
with strategy.scope():
    model = keras.Sequential(
        [keras.layers.Input(shape=(8,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=epochs, batch_size=64, verbose=2)
np.save(out, np.concatenate([w.ravel() for w in model.get_weights()]))
"""

# A user callback standing in for the IMDS watcher: the notice appears as epoch 3 begins.
NOTICE_SCRIPT = """\
import json, os, sys
import numpy as np
import keras
from keras import layers

class Watcher(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            with open(os.environ["CLOUDTRAIN_NOTICE_FILE"], "w") as f:
                json.dump({"kind": "interruption", "action": "terminate", "time": "2026-11-28T12:02:00Z"}, f)

rng = np.random.RandomState(0)
x = rng.rand(256, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("int32")
model = keras.Sequential([layers.Input(shape=(8,)), layers.Dense(8), layers.Dense(2, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=4, batch_size=32, verbose=2, callbacks=[Watcher()])
"""

EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def tf_image() -> Path:
    return simimage.ensure_image(("tensorflow",))


class Job:
    """A run folder configured by the agent's `backend`, and a way to run a script in it."""

    def __init__(self, tmp: Path, image: Path, backend: str, keras: int | None = None, **options: object):
        self.tmp = tmp
        self.ckpt = tmp / "ckpt"
        cache = image / "theano-cache"  # copied into the run's HOME: the image stays read-only
        out = configure(
            backend,
            str(tmp / "home"),
            str(tmp / "run"),
            gpu="no",
            keras=keras,
            compile_cache=str(cache) if backend == "theano" else None,
            checkpoint_dir=str(self.ckpt),
            **options,
        )
        self.env = dict(out["env"])
        self.env.update(PATH=os.environ["PATH"], CLOUDTRAIN_TESTING="1", TF_CPP_MIN_LOG_LEVEL="3")
        self.python = image / "envs" / ("theano" if backend == "theano" else "tensorflow") / "bin" / "python"

    def run(self, script: str, *args: str, kill: str | None = None) -> subprocess.CompletedProcess[str]:
        path = self.tmp / "train.py"
        path.write_text(script)
        env = dict(self.env)
        if kill:
            env[checkpoint.TEST_KILL_ENV] = kill
        done = subprocess.run(
            [str(self.python), str(path), *args],
            cwd=self.tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        expected = -signal.SIGKILL if kill else 0
        assert done.returncode == expected, (done.returncode, done.stdout[-3000:], done.stderr[-5000:])
        return done


def epochs_run(*runs: subprocess.CompletedProcess[str]) -> list[str]:
    return [f"{m[0]}/{m[1]}" for r in runs for m in EPOCH_LINE.findall(r.stdout)]


def recorded(job: Job) -> list[tuple[int, int, int]]:
    """(fit, epoch, epochs) of each epoch in the run's metrics, as the controller reads them;
    every row has the loss."""
    rows = metrics.series(job.tmp / "run")
    assert all(isinstance(row["logs"]["loss"], float) and row["epoch_s"] >= 0 for row in rows), rows
    return [(row["fit"], row["epoch"], row["epochs"]) for row in rows]


def ct_lines(run: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("[cloudtrain] checkpoint:")]


def test_keras3_killed_after_an_epoch_resumes_to_the_same_weights_bit_for_bit(
    tf_image: Path, tmp_path: Path
) -> None:
    # The stretch goal: with a seed, interrupted + resumed == never interrupted, bitwise (CPU).
    plain = Job(tmp_path / "plain", tf_image, "tensorflow", seed=11)
    whole = plain.run(KERAS3_SCRIPT, "4", "whole.npy", "16")
    assert epochs_run(whole) == ["1/4", "2/4", "3/4", "4/4"]

    job = Job(tmp_path / "job", tf_image, "tensorflow", seed=11)
    first = job.run(KERAS3_SCRIPT, "4", "never.npy", "16", kill="saved:2")  # SIGKILL after epoch 2
    assert ct_lines(first)[-2] == "[cloudtrain] checkpoint: epoch 2 saved"
    second = job.run(KERAS3_SCRIPT, "4", "resumed.npy", "16")
    assert epochs_run(first, second) == ["1/4", "2/4", "3/4", "4/4"]  # exactly the epochs asked for
    restored = ct_lines(second)[0]
    assert restored.startswith(f"[cloudtrain] checkpoint: restored epoch 2 from {job.ckpt}/fit0-epoch0002-")
    assert restored.endswith("fit 0 continues at epoch 3")
    assert (job.tmp / "resumed.npy").read_bytes() == (plain.tmp / "whole.npy").read_bytes()

    manifest = checkpoint.verify(str(job.ckpt))
    assert manifest is not None and manifest["epoch"] == 4 and manifest["fits"]["0"]["complete"] is True
    assert manifest["keras"]["flavour"] == "keras3" and manifest["keras"]["backend"] == "tensorflow"
    assert recorded(job) == [(0, 1, 4), (0, 2, 4), (0, 3, 4), (0, 4, 4)]  # one series across the kill


def test_tf_keras_killed_mid_write_resumes_from_the_previous_checkpoint(
    tf_image: Path, tmp_path: Path
) -> None:
    job = Job(tmp_path, tf_image, "tensorflow", keras=2)
    # Fit 0 (2 epochs) finishes; fit 1 trains epochs 1 and 2 and dies writing epoch 2's checkpoint.
    first = job.run(KERAS2_SCRIPT, "2,3", "never.npy", kill="file:4")
    assert epochs_run(first) == ["1/2", "2/2", "1/3", "2/3"]
    assert ct_lines(first)[-1] == "[cloudtrain] checkpoint: test: killed during save 4 at file"
    assert [p.name for p in job.ckpt.iterdir() if p.name.startswith(".tmp-fit1-epoch0002-")]

    second = job.run(KERAS2_SCRIPT, "2,3", "resumed.npy")
    lines = ct_lines(second)
    assert "fit 0 had finished" in lines[0]
    assert "restored epoch 1 from" in lines[1] and lines[1].endswith("fit 1 continues at epoch 2")
    assert epochs_run(second) == ["2/3", "3/3"]
    manifest = checkpoint.verify(str(job.ckpt))
    assert manifest is not None and manifest["keras"]["flavour"] == "tf_keras"
    assert {f: e["epoch"] for f, e in manifest["fits"].items()} == {"0": 2, "1": 3}
    assert recorded(job) == [(0, 1, 2), (0, 2, 2), (1, 1, 3), (1, 2, 3), (1, 3, 3)]  # fit 1's epoch 2 twice
    # The half-written folder is gone; only what the manifest (and the one before) names is kept.
    assert not [p for p in job.ckpt.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("keras", [3, 2])
def test_a_mirrored_strategy_fit_resumes_with_its_optimizer_state(
    tf_image: Path, tmp_path: Path, keras: int
) -> None:
    plain = Job(tmp_path / "plain", tf_image, "tensorflow", keras=keras, seed=5)
    whole = plain.run(MIRRORED_SCRIPT, "4", "whole.npy")
    job = Job(tmp_path / "job", tf_image, "tensorflow", keras=keras, seed=5)
    first = job.run(MIRRORED_SCRIPT, "4", "never.npy", kill="saved:2")
    second = job.run(MIRRORED_SCRIPT, "4", "resumed.npy")
    restored = ct_lines(second)[0]  # its optimizer's variables built outside the scope, it failed
    assert restored.startswith(f"[cloudtrain] checkpoint: restored epoch 2 from {job.ckpt}/"), restored
    assert restored.endswith("fit 0 continues at epoch 3")
    assert epochs_run(first, second) == ["1/4", "2/4", "3/4", "4/4"] == epochs_run(whole)
    if keras == 3:  # tf-keras reshuffles differently after a resume (docs/runs.md)
        assert (job.tmp / "resumed.npy").read_bytes() == (plain.tmp / "whole.npy").read_bytes()


def test_theano_keras_2_3_1_resumes_after_sigkill(theano_image: Path, tmp_path: Path) -> None:
    job = Job(tmp_path, theano_image, "theano")
    first = job.run(KERAS2_SCRIPT, "3,1", "never.npy", kill="saved:1")
    assert epochs_run(first) == ["1/3"]
    second = job.run(KERAS2_SCRIPT, "3,1", "resumed.npy")
    assert epochs_run(first, second) == ["1/3", "2/3", "3/3", "1/1"]
    assert ct_lines(second)[0].endswith("fit 0 continues at epoch 2")
    manifest = checkpoint.verify(str(job.ckpt))
    assert manifest is not None and manifest["keras"] == {
        "flavour": "keras2",
        "version": "2.3.1",
        "backend": "theano",
    }
    assert manifest["fits"]["0"]["epoch"] == 3 and manifest["fits"]["1"]["complete"] is True
    assert recorded(job) == [(0, 1, 3), (0, 2, 3), (0, 3, 3), (1, 1, 1)]


def test_a_notice_saves_the_last_finished_epoch_at_once(tf_image: Path, tmp_path: Path) -> None:
    job = Job(tmp_path, tf_image, "tensorflow", checkpoint_every=10)
    assert job.env["CLOUDTRAIN_NOTICE_FILE"] == str(tmp_path / "run" / "notice.json")
    done = job.run(NOTICE_SCRIPT)
    # Seen at a batch end of epoch 3 (epoch 2 was the last finished), or at its end (epoch 3):
    # either way the last finished epoch is saved at once, then every epoch.
    assert ct_lines(done)[1:] in (
        [
            "[cloudtrain] checkpoint: epoch 2 saved at once (notice: interruption terminate)",
            "[cloudtrain] checkpoint: epoch 3 saved",  # from the notice on, every epoch
            "[cloudtrain] checkpoint: epoch 4 saved",
        ],
        [
            "[cloudtrain] checkpoint: epoch 3 saved at once (notice: interruption terminate)",
            "[cloudtrain] checkpoint: epoch 4 saved",
        ],
    )
    assert epochs_run(done) == ["1/4", "2/4", "3/4", "4/4"]


def test_a_checkpoint_without_manifest_is_ignored_with_a_message(tf_image: Path, tmp_path: Path) -> None:
    job = Job(tmp_path, tf_image, "tensorflow")
    half = job.ckpt / "fit0-epoch0003-abc-1"
    half.mkdir(parents=True)
    (half / "weights.npz").write_bytes(b"half")
    done = job.run(KERAS3_SCRIPT, "2", "w.npy", "4")
    assert ct_lines(done)[0] == (
        f"[cloudtrain] checkpoint: ignoring {job.ckpt}: {job.ckpt} has no manifest.json "
        "(an incomplete checkpoint); fit 0 starts at epoch 1"
    )
    assert epochs_run(done) == ["1/2", "2/2"] and not half.exists()
    assert checkpoint.verify(str(job.ckpt)) is not None

    # Another model (other weight shapes) for fit 0: the checkpoint is refused, training starts over.
    other = job.run(KERAS3_SCRIPT, "2", "other.npy", "6")
    assert "fit 0's model does not match the checkpoint's (weight shapes" in ct_lines(other)[0]
    assert epochs_run(other) == ["1/2", "2/2"]


# Every way a script reaches Keras; `K` is what it then builds with.
REACH = {
    "import keras": "import keras as K",
    "from tensorflow import keras": "from tensorflow import keras as K",
    "tf.keras": "import tensorflow as tf\nK = tf.keras",
    "import tf_keras": "import tf_keras as K",
}
REACH_SCRIPT = """\
{reach}
import numpy as np

rng = np.random.RandomState(0)
x = rng.rand(64, 4).astype("float32")
y = (x.sum(axis=1) > 2).astype("int32")
model = K.Sequential([K.layers.Input(shape=(4,)), K.layers.Dense(8, activation="relu"),
                      K.layers.Dense(2, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
for _ in range(2):  # two fits of the same model, as a loop of fit(epochs=N) does
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=2)
    print("history:", history.history["loss"], flush=True)
print("model:", type(model).__module__.split(".")[0])
"""


def histories(run: subprocess.CompletedProcess[str]) -> list[list[float]]:
    return [
        json.loads(line.split(":", 1)[1]) for line in run.stdout.splitlines() if line.startswith("history:")
    ]


@pytest.mark.parametrize("keras", [2, 3])
@pytest.mark.parametrize("reach", list(REACH))
def test_fit_resumes_however_the_script_reaches_keras(
    tf_image: Path, tmp_path: Path, reach: str, keras: int
) -> None:
    # `from tensorflow import keras` and `tf.keras` reach Keras through TensorFlow's lazy
    # loader, after `import tensorflow` has probed for it with importlib.util.find_spec.
    job = Job(tmp_path, tf_image, "tensorflow", keras=keras)
    script = REACH_SCRIPT.format(reach=REACH[reach])
    first = job.run(script, kill="saved:3")  # SIGKILL once fit 1's epoch 1 is saved
    assert ct_lines(first)[-2:] == [
        "[cloudtrain] checkpoint: epoch 1 saved",
        "[cloudtrain] checkpoint: test: killed during save 3 at saved",
    ]
    second = job.run(script)
    lines = ct_lines(second)
    # Fit 0 had finished: it trains nothing, its model gets fit 1's state, and it returns
    # its History as the first run did; fit 1 continues at its epoch 2.
    assert lines[0].endswith("fit 0 had finished; its model trained on in fit 1")
    assert lines[1].endswith("fit 1 continues at epoch 2")
    assert epochs_run(first, second) == ["1/2", "2/2", "1/2", "2/2"]
    assert histories(second)[0] == histories(first)[0] and len(histories(second)[1]) == 2
    flavour = "tf_keras" if keras == 2 or reach == "import tf_keras" else "keras"
    assert f"model: {flavour}\n" in second.stdout
    manifest = checkpoint.verify(str(job.ckpt))
    assert manifest is not None and (manifest["fit"], manifest["epoch"]) == (1, 2)
    assert manifest["keras"]["flavour"] == {"tf_keras": "tf_keras", "keras": "keras3"}[flavour]
    # One saved state for the one model: fit 0's lives on in fit 1's.
    assert manifest["fits"]["0"]["continued_by"] == 1 and "folder" not in manifest["fits"]["0"]
    assert {rel.split("/")[0] for rel in manifest["files"]} == {manifest["fits"]["1"]["folder"]}


# A keras-io style loop: one fit(epochs=1) per iteration, and code between the iterations.
LOOP_SCRIPT = KERAS3_SCRIPT.replace(
    "model.fit(x, y, epochs=epochs, batch_size=32, verbose=2)\n",
    "for iteration in range(1, epochs + 1):\n"
    "    print('Iteration', iteration, flush=True)\n"
    "    loss = model.fit(x, y, epochs=1, batch_size=32, verbose=2).history['loss'][-1]\n"
    "    print('loss', loss, 'sample', np.random.randint(1000), flush=True)\n",
)


def trained(run: subprocess.CompletedProcess[str]) -> int:
    return len(re.findall(r"^8/8 - ", run.stdout, re.MULTILINE))


def test_a_loop_of_one_epoch_fits_resumes_at_the_first_unfinished_iteration_bit_for_bit(
    tf_image: Path, tmp_path: Path
) -> None:
    assert LOOP_SCRIPT != KERAS3_SCRIPT
    plain = Job(tmp_path / "plain", tf_image, "tensorflow", seed=5)
    whole = plain.run(LOOP_SCRIPT, "4", "whole.npy", "16")
    job = Job(tmp_path / "job", tf_image, "tensorflow", seed=5)
    first = job.run(LOOP_SCRIPT, "4", "never.npy", "16", kill="saved:2")  # after iteration 2
    second = job.run(LOOP_SCRIPT, "4", "resumed.npy", "16")
    # Iterations 1 and 2 are not trained again; 3 and 4 are (Keras prints no "Epoch 1/1"
    # for epochs=1: count the epochs' progress lines, 8 batches each).
    # The first run is killed in iteration 2's save, before Keras prints that epoch's line.
    assert first.stdout.count("Iteration") == 2 and trained(second) == 2 and trained(whole) == 4
    assert second.stdout.count("Iteration") == 4
    assert ct_lines(second)[0].endswith("fit 0 had finished; its model trained on in fit 1")
    assert ct_lines(second)[1].endswith(": fit 1 had finished")
    assert ct_lines(second)[2].endswith("has none for fit 2: it starts at epoch 1")
    # The resumed run's iterations 3 and 4 are those of the run never interrupted: the same
    # losses and random samples between iterations, the same final weights, bit for bit.
    losses = [line for line in whole.stdout.splitlines() if line.startswith("loss ")]
    assert [line for line in second.stdout.splitlines() if line.startswith("loss ")][2:] == losses[2:]
    assert (job.tmp / "resumed.npy").read_bytes() == (plain.tmp / "whole.npy").read_bytes()
    # The replayed iterations return their History as it was (the script reads it).
    assert [line.split()[1] for line in second.stdout.splitlines() if line.startswith("loss ")][:2] == [
        line.split()[1] for line in losses[:2]
    ]
    manifest = checkpoint.verify(str(job.ckpt))
    assert manifest is not None and sorted(manifest["fits"]) == ["0", "1", "2", "3"]
    assert [manifest["fits"][f].get("continued_by") for f in "0123"] == [3, 3, 3, None]


# --- the format, without Keras ----------------------------------------------------------------

SAVE = """\
import sys
from cloudtrain.agent.checkpoint import Store
store = Store(sys.argv[1])
for epoch in (1, 2, 3):
    payload = {n: (n * epoch * 1000).encode() for n in ("weights.npz", "optimizer.npz", "extra.npz", "state.json")}
    store.save(0, epoch, payload, {"epochs": 3, "complete": epoch == 3}, {"flavour": "test"})
"""


@pytest.mark.parametrize("stage", ["file", "folder", "manifest"])
def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint(tmp_path: Path, stage: str) -> None:
    folder = tmp_path / "ckpt"
    env = dict(os.environ, CLOUDTRAIN_TESTING="1", CLOUDTRAIN_CHECKPOINT_TEST_KILL=f"{stage}:2")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", SAVE, str(folder)], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    manifest = checkpoint.verify(str(folder))
    assert manifest is not None and manifest["epoch"] == 1
    entry = checkpoint.fit_entry(str(folder), manifest, 0)
    assert entry is not None and entry["epoch"] == 1
    assert (folder / entry["folder"] / "weights.npz").read_bytes() == b"weights.npz" * 1000

    # The next complete save replaces it and sweeps away what the killed one left.
    env.pop("CLOUDTRAIN_CHECKPOINT_TEST_KILL")
    subprocess.run([sys.executable, "-c", SAVE, str(folder)], env=env, check=True)
    manifest = checkpoint.verify(str(folder))
    assert manifest is not None and manifest["epoch"] == 3
    names = sorted(p.name for p in folder.iterdir())
    assert (
        len(names) == 3 and names[-1] == "manifest.json"
    )  # epochs 2 and 3: this manifest and the one before
    assert all(n.startswith(("fit0-epoch0002-", "fit0-epoch0003-")) for n in names[:2])


def test_a_damaged_checkpoint_is_refused_with_the_reason(tmp_path: Path) -> None:
    store = checkpoint.Store(str(tmp_path))
    payload = {n: n.encode() for n in ("weights.npz", "optimizer.npz", "extra.npz", "state.json")}
    folder = store.save(0, 1, payload, {"epochs": 2}, {"flavour": "test"})
    manifest = checkpoint.verify(str(tmp_path))
    assert manifest is not None and set(manifest["files"]) == {f"{folder}/{n}" for n in payload}
    assert manifest["files"][f"{folder}/state.json"]["size"] == len("state.json")

    (tmp_path / folder / "weights.npz").write_bytes(b"weights.npX")  # same size, other bytes
    with pytest.raises(checkpoint.Invalid, match="weights.npz does not match its sha256"):
        checkpoint.verify(str(tmp_path))
    (tmp_path / folder / "weights.npz").unlink()
    with pytest.raises(checkpoint.Invalid, match="weights.npz is missing"):
        checkpoint.verify(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"schema": 99}')
    with pytest.raises(checkpoint.Invalid, match="unknown schema 99"):
        checkpoint.verify(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(checkpoint.Invalid, match="not valid JSON"):
        checkpoint.verify(str(tmp_path))
    shutil.rmtree(tmp_path)
    assert checkpoint.verify(str(tmp_path)) is None  # nothing at all: no checkpoint yet, no error


def test_the_checkpoint_folder_is_relocatable(tmp_path: Path) -> None:
    store = checkpoint.Store(str(tmp_path / "a"))
    payload = {n: n.encode() for n in ("weights.npz", "optimizer.npz", "extra.npz", "state.json")}
    store.save(0, 1, payload, {"epochs": 2}, {"flavour": "test"})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    text = (tmp_path / "b" / "manifest.json").read_text()
    assert str(tmp_path) not in text
    assert json.loads(text)["fit"] == 0 and checkpoint.verify(str(tmp_path / "b")) is not None


def test_a_snapshot_is_one_whole_save_that_newer_saves_cannot_prune(tmp_path: Path) -> None:
    store = checkpoint.Store(str(tmp_path / "ckpt"))
    assert checkpoint.snapshot(store.directory, str(tmp_path / "none")) is None  # nothing saved yet
    names = ("weights.npz", "optimizer.npz", "extra.npz", "state.json")
    for epoch in (1, 2):
        store.save(0, epoch, {n: n.encode() * epoch for n in names}, {"epochs": 9}, {"flavour": "test"})
    held = checkpoint.snapshot(store.directory, str(tmp_path / "held"))
    assert held is not None and held["epoch"] == 2
    for epoch in (3, 4, 5):  # these prune epoch 2's folder on the instance
        store.save(0, epoch, {n: n.encode() * epoch for n in names}, {"epochs": 9}, {"flavour": "test"})
    folder = held["fits"]["0"]["folder"]
    assert not (tmp_path / "ckpt" / folder).exists()
    assert checkpoint.verify(str(tmp_path / "held")) == held  # whole, at every file's sha256
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == [folder, "manifest.json"]

    # Where hard links cannot go (another filesystem), the files are copied.
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        other = Path(tempfile.mkdtemp(dir="/dev/shm"))
        try:
            copied = checkpoint.snapshot(store.directory, str(other / "held"))
            assert copied is not None and copied["epoch"] == 5
            assert checkpoint.verify(str(other / "held")) == copied
        finally:
            shutil.rmtree(other)

    # A manifest naming a file outside a saved folder is refused, not followed.
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    manifest["files"]["../outside"] = {"size": 1}
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.Invalid, match="not a file of a saved folder"):
        checkpoint.snapshot(store.directory, str(tmp_path / "bad"))


def test_pack_sends_a_checkpoints_latest_save_and_sweeps_snapshots_of_dead_packs(tmp_path: Path) -> None:
    from cloudtrain.agent import pack
    from cloudtrain.agent.receive import StreamReceiver

    root = tmp_path / "remote"
    store = checkpoint.Store(str(root / "checkpoint"))
    names = ("weights.npz", "optimizer.npz", "extra.npz", "state.json")
    for epoch in (1, 2, 3):
        store.save(0, epoch, {n: n.encode() * epoch for n in names}, {"epochs": 9}, {"flavour": "test"})
    (root / "checkpoint" / ".tmp-fit0-epoch0004-x").mkdir()  # a save being written
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / f"{pack.SNAPSHOT_PREFIX}{dead.pid}" / "checkpoint").mkdir(parents=True)  # a killed pack's
    read, write = os.pipe()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudtrain.agent.pack",
            "--root",
            str(root),
            "--checkpoint",
            "--paths",
            "checkpoint",
        ],
        stdout=write,
    )
    os.close(write)
    receiver = StreamReceiver(str(tmp_path / "home"), only=["checkpoint"])
    with os.fdopen(read, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 16), b""):
            receiver.feed(chunk)
    assert child.wait() == 0
    receiver.finish()
    receiver.close()
    home = tmp_path / "home" / "checkpoint"
    manifest = checkpoint.verify(str(home))
    assert manifest is not None and manifest["epoch"] == 3
    assert sorted(p.name for p in home.iterdir()) == [manifest["fits"]["0"]["folder"], "manifest.json"]
    assert sorted(p.name for p in root.iterdir()) == [
        "checkpoint"
    ]  # no snapshot left, its own or the dead one's


def test_a_finished_fit_continued_by_a_later_fit_of_its_model_keeps_no_state_of_its_own(
    tmp_path: Path,
) -> None:
    # A loop of fit(epochs=1) on one model: fit 3's save stands for fits 0..2, which keep
    # their entries (epochs, history) but no folder: one saved state per model, not per fit.
    store = checkpoint.Store(str(tmp_path))
    payload = {n: n.encode() for n in ("weights.npz", "optimizer.npz", "extra.npz", "state.json")}
    for fit in range(3):
        entry = {"epochs": 1, "complete": True, "history": {"loss": [fit / 10]}}
        store.save(fit, 1, payload, entry, {"flavour": "test"}, continues=tuple(range(fit)))
    other = store.save(3, 1, payload, {"epochs": 1, "complete": True}, {"flavour": "test"})  # another model
    last = store.save(
        4, 1, payload, {"epochs": 2, "complete": False}, {"flavour": "test"}, continues=(0, 1, 2)
    )
    manifest = checkpoint.verify(str(tmp_path))
    assert manifest is not None
    fits = manifest["fits"]
    assert [fits[f].get("continued_by") for f in "01234"] == [4, 4, 4, None, None]  # never a chain
    assert "folder" not in fits["0"] and fits["2"]["history"] == {"loss": [0.2]}
    assert {rel.split("/")[0] for rel in manifest["files"]} == {other, last}
    assert checkpoint.continuation(str(tmp_path), manifest, 1, fits["1"]) == (4, dict(fits["4"]))
    # Kept on disk: what this manifest and the one before name (a copier may be reading it).
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("fit2-")]) == 1

    # A continuation that leads nowhere is refused, with the reason.
    manifest["fits"]["1"]["continued_by"] = 9
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.Invalid, match="fit 1 continues in fit 9, which manifest.json lacks"):
        checkpoint.verify(str(tmp_path))


# A user callback peeks at the progress file as fit, evaluate and predict step.
PROGRESS_SCRIPT = """\
import json, os
import numpy as np
import keras
from keras.layers import Dense
from keras.models import Sequential

seen = []


def peek(what):
    with open(os.environ["CLOUDTRAIN_PROGRESS_FILE"]) as f:
        seen.append([what, json.load(f)])


class Peek(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        peek("fit")

    def on_test_batch_end(self, batch, logs=None):
        if batch == 3:
            peek("evaluate")

    def on_predict_batch_end(self, batch, logs=None):
        if batch == 3:
            peek("predict")


rng = np.random.RandomState(0)
x = rng.rand(256, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("int32")
model = Sequential([Dense(8, input_shape=(8,), activation="relu"), Dense(2, activation="softmax")])
model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[Peek()])
model.evaluate(x, y, batch_size=16, verbose=0, callbacks=[Peek()])
model.predict(x, batch_size=16, verbose=0, callbacks=[Peek()])
peek("after")
print("SEEN " + json.dumps(seen))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "theano"])
def test_the_progress_file_says_where_fit_evaluate_and_predict_stand(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    image = request.getfixturevalue("theano_image" if backend == "theano" else "tf_image")
    job = Job(tmp_path, image, backend)
    done = job.run(PROGRESS_SCRIPT)
    seen = json.loads(done.stdout.split("SEEN ", 1)[1])
    assert [what for what, _ in seen] == ["fit", "fit", "evaluate", "predict", "after"]
    first, second, evaluate, predict, after = (state for _, state in seen)
    # the user's callback runs before the hook's: epoch 1 ends with nothing done yet
    for state, epoch, done_epochs in ((first, 1, 0), (second, 2, 1)):
        assert (state["call"], state["active"], state["fit"]) == ("fit", True, 0)
        assert (state["epoch"], state["epochs"], state["done"], state["steps"]) == (epoch, 2, done_epochs, 8)
        assert state["epoch_elapsed_s"] >= 0 and state["at"].endswith("Z")
    assert second["logs"]["loss"] > 0 and second["epoch_s"] >= 0  # epoch 1's
    assert (evaluate["call"], evaluate["active"], evaluate["steps"]) == ("evaluate", True, 16)
    assert (predict["call"], predict["active"], predict["steps"]) == ("predict", True, 16)
    assert after["active"] is False and "call" not in after
