"""Benchmark: what a spot interruption costs a run, in `--dry-run`.

    python benchmarks/interruption_bench.py [--epochs 10] [--epoch-s 3] [--at 4] [--notice-s 30]

Runs a seed-style Keras 3 script (a Dense model; each epoch padded to EPOCH_S seconds by
a callback, standing in for real work) with `cloudtrain run --dry-run
--simulate-interruption epoch:AT`: the simulated IMDS gives the spot notice when epoch AT
starts, and the simulator terminates the instance NOTICE_S seconds later (AWS: 120). The
agent polls IMDS every 5 s, as on AWS. From the run's events and log it reports:

- notice -> resumed: from the notice to training running again on the replacement
  instance (relaunch, boot, provisioning, sync, checkpoint restore);
- work lost: epochs trained twice (started on the lost instance and again after resuming),
  against what restarting from scratch (what tools without checkpoints do) would redo.

The last line: `notice->resumed=<s> s; epochs redone: cloudtrain <n>, from scratch <m>`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

TRAIN = """
import os, time
import numpy as np
import keras
EPOCH_S = float(os.environ.get("EPOCH_S", "3"))
x = np.random.rand(512, 16).astype("float32")
y = (x.sum(axis=1) > 8).astype("float32")
model = keras.Sequential([keras.Input(shape=(16,)), keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer="adam", loss="binary_crossentropy")
class Pad(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.monotonic()
    def on_epoch_end(self, epoch, logs=None):
        time.sleep(max(0.0, EPOCH_S - (time.monotonic() - self.start)))
model.fit(x, y, epochs=int(os.environ["EPOCHS"]), batch_size=32, verbose=2, callbacks=[Pad()])
"""


def at(event: dict[str, str]) -> datetime:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epoch-s", type=float, default=3.0)
    parser.add_argument("--at", type=int, default=4, help="the epoch whose start brings the notice")
    parser.add_argument("--notice-s", type=float, default=30.0, help="notice to termination (AWS: 120)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ct-interruption-") as tmp:
        folder = Path(tmp) / "job"
        folder.mkdir()
        (folder / "train.py").write_text(textwrap.dedent(TRAIN))
        (folder / "job.yaml").write_text(
            "name: interruption-bench\nrun: python train.py\nseed: 1\nresources: {gpu: T4}\n"
            f"env: {{EPOCHS: '{args.epochs}', EPOCH_S: '{args.epoch_s}'}}\n"
        )
        env = dict(os.environ, CLOUDTRAIN_HOME=str(Path(tmp) / "home"))
        env["CLOUDTRAIN_SIM_NOTICE_S"] = str(args.notice_s)
        env.pop("CLOUDTRAIN_IMDS_POLL_S", None)  # the agent polls every 5 s, as on AWS
        cli = [str(Path(sys.executable).parent / "cloudtrain")]  # the console script, as a user runs it
        started = time.monotonic()
        done = subprocess.run(
            [
                *cli,
                "run",
                str(folder / "job.yaml"),
                "--dry-run",
                "--out",
                str(Path(tmp) / "runs"),
                "--simulate-interruption",
                f"epoch:{args.at}",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - started
        subprocess.run([*cli, "sim", "stop"], env=env, capture_output=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        record = json.loads(done.stdout)
        events = record["events"]
        notice = next(e for e in events if e["kind"] == "notice")
        recovering = next(i for i, e in enumerate(events) if e["kind"] == "recovering")
        resumed = next(e for e in events[recovering:] if e["kind"] == "running")
        log = (Path(record["run_dir"]) / "logs" / "train.log").read_text()
        started_epochs = [int(n) for n in re.findall(rf"^Epoch (\d+)/{args.epochs}$", log, re.M)]
        restore = next(e for e in events if e["kind"] == "restore")
        restored = int(re.search(r"epoch (\d+)", restore["message"]).group(1))  # type: ignore[union-attr]
        before = started_epochs[: len(started_epochs) - (args.epochs - restored)]
        redone = len(before) - restored  # started on the lost instance beyond the checkpoint
        scratch = len(before)  # without checkpoints every epoch started there is trained again
        gap = (at(resumed) - at(notice)).total_seconds()
    print(
        f"run: {args.epochs} epochs of {args.epoch_s:g} s, notice at epoch {args.at}, "
        f"termination {args.notice_s:g} s later; {wall:.0f} s in all, {len(record['instances'])} instances"
    )
    print(f"checkpoint restored: epoch {restored}; epochs started on the lost instance: {before}")
    print(f"notice->resumed={gap:.0f} s; epochs redone: cloudtrain {redone}, from scratch {scratch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
