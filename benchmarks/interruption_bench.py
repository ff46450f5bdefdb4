"""Benchmark: what a spot interruption costs a run, with cloudtrain's checkpoints and without.

    python benchmarks/interruption_bench.py [--epochs 20] [--epoch-s 3] [--at 4] [--notice-s 30]
                                           [--margin-s 7.5] [--repeat 3]

Runs a seed-style Keras 3 script (a Dense model; each epoch padded to EPOCH_S seconds by
a callback, standing in for real work) with `cloudtrain run --dry-run
--simulate-interruption epoch:AT`: the simulated IMDS gives the spot notice when epoch AT
starts, and the simulator terminates the instance NOTICE_S seconds later. AWS's timeline
is scaled down by 4: its notice is 120 s, and cloudtrain's training holds (saved) once
the termination is less than CLOUDTRAIN_NOTICE_MARGIN_S away (30 s; here MARGIN_S). The
job is longer than the notice, so neither side can finish before the termination. The
agent polls IMDS every 5 s, as on AWS. Two sides, run for real, interleaved, REPEAT
times each:

- cloudtrain: the job as written (checkpoints on, as they always are);
- from scratch: the same job and interruption with the checkpoint hooks off (its `run:`
  is `env -u CLOUDTRAIN_CHECKPOINT_DIR python train.py`), so the replacement instance
  trains from epoch 1, as a tool without checkpoints does.

From each run's events and log: notice -> resumed (from the notice to training running
again on the replacement instance: relaunch, boot, provisioning, sync, restore), epochs
trained twice (epochs started in the log beyond the EPOCHS asked for), and notice ->
done. The last line gives the medians: `notice->resumed=<s> s; epochs redone: cloudtrain
<n>, from scratch <m>; notice->done: cloudtrain <s> s, from scratch <s> s`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
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


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


SIDES = {"cloudtrain": "python train.py", "from scratch": "env -u CLOUDTRAIN_CHECKPOINT_DIR python train.py"}


def one_run(args: argparse.Namespace, run: str, tmp: Path) -> dict[str, float]:
    """One interrupted dry-run of the job with `run`: its timings and epochs trained twice."""
    folder = tmp / "job"
    folder.mkdir()
    (folder / "train.py").write_text(textwrap.dedent(TRAIN))
    (folder / "job.yaml").write_text(
        f"name: interruption-bench\nrun: {run}\nseed: 1\nresources: {{gpu: T4}}\n"
        f"env: {{EPOCHS: '{args.epochs}', EPOCH_S: '{args.epoch_s}', "
        f"CLOUDTRAIN_NOTICE_MARGIN_S: '{args.margin_s}'}}\n"
    )
    env = dict(os.environ, CLOUDTRAIN_HOME=str(tmp / "home"))
    env["CLOUDTRAIN_SIM_NOTICE_S"] = str(args.notice_s)
    env.pop("CLOUDTRAIN_IMDS_POLL_S", None)  # the agent polls every 5 s, as on AWS
    cli = [str(Path(sys.executable).parent / "cloudtrain")]  # the console script, as a user runs it
    started = time.monotonic()
    done = subprocess.run(
        [*cli, "run", str(folder / "job.yaml"), "--dry-run", "--out", str(tmp / "runs")]
        + ["--simulate-interruption", f"epoch:{args.at}", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - started
    subprocess.run([*cli, "sim", "stop"], env=env, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"interruption_bench: the run exited {done.returncode}:\n{done.stderr}")
    record = json.loads(done.stdout)
    events = record["events"]
    notice = next(e for e in events if e["kind"] == "notice")
    recovering = next((i for i, e in enumerate(events) if e["kind"] == "recovering"), None)
    if recovering is None:  # it finished before the termination: the job is too short to tell
        raise SystemExit(f"interruption_bench: `{run}` finished on the first instance; use more --epochs")
    resumed = next(e for e in events[recovering:] if e["kind"] == "running")
    log = (Path(record["run_dir"]) / "logs" / "train.log").read_text()
    started_epochs = re.findall(rf"^Epoch (\d+)/{args.epochs}$", log, re.M)
    return {
        "resumed": (when(resumed["at"]) - when(notice["at"])).total_seconds(),
        "redone": len(started_epochs) - args.epochs,
        "done": (when(record["ended_at"]) - when(notice["at"])).total_seconds(),
        "wall": wall,
        "instances": len(record["instances"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--epoch-s", type=float, default=3.0)
    parser.add_argument("--at", type=int, default=4, help="the epoch whose start brings the notice")
    parser.add_argument("--notice-s", type=float, default=30.0, help="notice to termination (AWS: 120)")
    parser.add_argument("--margin-s", type=float, default=7.5, help="hold this close to it (cloudtrain: 30)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side, interleaved")
    args = parser.parse_args()
    print(
        f"{args.epochs} epochs of {args.epoch_s:g} s, notice at epoch {args.at}, termination "
        f"{args.notice_s:g} s later, hold {args.margin_s:g} s before it; {args.repeat} runs of each side"
    )
    results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for i in range(args.repeat):
        for side, run in SIDES.items():
            with tempfile.TemporaryDirectory(prefix="ct-interruption-") as tmp:
                result = one_run(args, run, Path(tmp))
            results[side].append(result)
            print(
                f"{side:>12} #{i + 1}: notice->resumed {result['resumed']:.0f} s, epochs redone "
                f"{result['redone']:.0f}, notice->done {result['done']:.0f} s, "
                f"{result['instances']:.0f} instances, {result['wall']:.0f} s in all",
                flush=True,
            )

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    print(
        f"notice->resumed={median('cloudtrain', 'resumed'):.0f} s; epochs redone: cloudtrain "
        f"{median('cloudtrain', 'redone'):g}, from scratch {median('from scratch', 'redone'):g}; "
        f"notice->done: cloudtrain {median('cloudtrain', 'done'):.0f} s, "
        f"from scratch {median('from scratch', 'done'):.0f} s (medians)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
