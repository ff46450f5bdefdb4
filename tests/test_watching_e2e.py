"""Watching a run, end to end in `--dry-run`: the live view on a terminal (both backends),
the run folder's metrics.csv and metrics.png, Keras's bars in the saved log, the estimate
against the bill, `plot`, and the stall guard stopping a hung `fit`.

The terminal is a real pseudo-terminal: the CLI finds stdout and stderr to be a tty, as in
a user's shell, and draws its live view there.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from test_backends_e2e import theano_image  # noqa: F401  (fixture)
from test_run_e2e import CLOUDTRAIN, cloudtrain, only_run, sim_image, status  # noqa: F401  (fixture)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

TF_TRAIN = """
    import os, time
    import numpy as np
    from tensorflow import keras

    rng = np.random.default_rng(0)
    x = rng.random((1280, 16)).astype("float32")
    y = (x[:, :8].sum(axis=1) > 4).astype("float32")
    model = keras.Sequential([keras.Input(shape=(16,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])

    class Slow(keras.callbacks.Callback):  # a bigger model's pace: about 4 s an epoch
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.1)

    model.fit(x, y, epochs=4, batch_size=32, verbose=1, validation_split=0.1, callbacks=[Slow()])
    model.evaluate(x, y, verbose=0)
    os.makedirs("outputs", exist_ok=True)
    np.savetxt("outputs/predictions.csv", model.predict(x[:10], verbose=0))
"""

THEANO_TRAIN = """
    import os, time
    import numpy as np
    from keras.callbacks import Callback
    from keras.layers import Dense
    from keras.models import Sequential

    rng = np.random.RandomState(0)
    x = rng.rand(1280, 16).astype("float32")
    y = (x[:, :8].sum(axis=1) > 4).astype("float32")
    model = Sequential([Dense(16, activation="relu", input_shape=(16,)), Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])

    class Slow(Callback):
        def on_batch_end(self, batch, logs=None):
            time.sleep(0.1)

    model.fit(x, y, epochs=4, batch_size=32, verbose=2, validation_split=0.1, callbacks=[Slow()])
    os.makedirs("outputs", exist_ok=True)
    np.savetxt("outputs/predictions.csv", model.predict(x[:10]))
"""


def write_job(folder: Path, train: str, backend: str, budget: dict[str, object] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(textwrap.dedent(train))
    job = {
        "name": f"watch-{backend}",
        "backend": backend,
        "run": "python train.py",
        "outputs": ["outputs/"],
        "resources": {"gpu": "T4"},
        "budget": budget or {"max_cost_usd": 1.0},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"


def on_a_terminal(*args: str, timeout: float = 600) -> tuple[int, str]:
    """Run the installed CLI with stdin, stdout and stderr on a pseudo-terminal of 120
    columns; its exit code and everything it drew there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [CLOUDTRAIN, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side has closed
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"still running after {timeout} s")
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def seen_live(screen: str, run_id: str) -> None:
    """The live view drew the run, the epoch with its bar, the ETA and the dollars."""
    text = ANSI.sub("", screen)
    assert re.search(rf"▸ running {run_id} · \d+ s · g4dn\.xlarge in us-east-1a, spot \$0\.\d{{4}}/h", text)
    assert re.search(r"epoch [1-4]/4 [━─]{30} \d+/\d+", text), text[-3000:]  # the view's own line
    money = re.findall(r"ETA \d+ s · \$(\d\.\d{4}) so far · projected \$(\d\.\d{4}) · \$\d\.\d{4} left", text)
    assert money, text[-3000:]
    for spent, projected in money:
        assert float(projected) >= float(spent) > 0


@pytest.mark.parametrize("backend", ["tensorflow", "theano"])
def test_the_live_view_on_a_terminal_then_metrics_plot_and_estimate(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    request.getfixturevalue("theano_image" if backend == "theano" else "sim_image")
    job = write_job(tmp_path / "job", THEANO_TRAIN if backend == "theano" else TF_TRAIN, backend)
    out = tmp_path / "runs"
    code, screen = on_a_terminal("run", str(job), "--dry-run", "--out", str(out))
    assert code == 0, ANSI.sub("", screen)[-3000:]
    run_dir = only_run(out)
    seen_live(screen, run_dir.name)

    # the run folder: a row per epoch, the picture, the log without redrawn bars
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == ["1", "2", "3", "4"]
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (run_dir / "logs" / "train.log").read_bytes()
    assert b"\r" not in log and b"\b" not in log
    if backend == "tensorflow":  # verbose=1: each epoch's bar, once, in its final state
        assert len(re.findall(rb"\n(?:\x1b\[1m)?36/36\b.* - val_loss: [0-9.]+\n", log)) == 4, log.decode()[
            -2000:
        ]

    # the estimate after the first epoch, against the bill
    record = status(run_dir.name)
    assert record["projected_usd"] > 0 and record["cost_usd"] > 0
    assert any(e["kind"] == "estimate" for e in record["events"])
    final = [line for line in ANSI.sub("", screen).splitlines() if line.startswith("done ")]
    assert final and f"(projected ${record['projected_usd']:.4f} after the first epoch)" in final[-1]
    report = cloudtrain("cost-report", check=True).stdout
    assert re.search(r"Estimates: 1 ended runs projected \$\d\.\d{4} after their first epoch, billed", report)

    # `plot` draws it again, where asked
    picture = tmp_path / "loss.png"
    plotted = cloudtrain("plot", run_dir.name, "-o", str(picture), check=True)
    assert plotted.stdout.strip() == str(picture) and picture.read_bytes()[:4] == b"\x89PNG"


HANG = """
    import time
    import numpy as np
    from tensorflow import keras

    x = np.random.rand(256, 8).astype("float32")
    model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")

    class Hang(keras.callbacks.Callback):  # a dead data loader, say
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                print("hanging at", time.time(), flush=True)
                time.sleep(3600)

    model.fit(x, x.sum(axis=1), epochs=5, verbose=2, callbacks=[Hang()])
"""


def test_a_run_hung_inside_fit_is_stopped_by_the_stall_guard(sim_image: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", HANG, "tensorflow", {"max_idle_minutes": 0.1})
    out = tmp_path / "runs"
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(out), timeout=300)
    ended = time.time()
    assert done.returncode == 4, done.stderr
    hung_at = float(re.search(r"hanging at ([0-9.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert ended - hung_at < 30, f"{ended - hung_at:.1f} s from the hang to the exit"
    assert "the training stalled: no progress for" in done.stderr and "inside fit" in done.stderr
    record = status(only_run(out).name)
    idle = [e["message"] for e in record["events"] if e["kind"] == "idle"]
    assert len(idle) == 1 and "budget.max_idle_minutes: 0.1" in idle[0]
    assert record["state"] == "failed" and record["exit_code"] is None  # stopped, not ended
    # the checkpoint of the epochs before the hang came home
    assert (only_run(out) / "checkpoint" / "manifest.json").is_file()
