"""Benchmark: how long the commands that only read the ledger take, over a bare start.

    python benchmarks/cli_startup.py [--repeat 15]

Times, as a user runs them (the installed `cloudtrain` console script, in a fresh
process each time), `--help`, `status`, `status --json`, `status RUN`, `cost-report`
and `logs RUN` on a home whose ledger holds 200 runs (ledger_bench's mix, 20 still
running), against the baseline of the same Python importing only click and rich's table
(what any such CLI pays).
Commands and the baseline are interleaved, after one round untimed (as after `pip install`,
the bytecode is then on disk); each figure is the median of REPEAT runs.
The goal: each command at most 0.10 s over the baseline. The last line:
`cli_startup: worst <command> +<s> s over the baseline (<s> s); goal +0.10 s: met|missed`;
the exit code is 1 when missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ledger_bench import fill  # beside this script

from cloudtrain.ledger import Ledger

GOAL_S = 0.10
BASELINE = [sys.executable, "-c", "import click, rich.table"]


def seed(home: Path, runs: int) -> str:
    """ledger_bench's ledger of ``runs`` runs; the newest finished one gets a run folder and
    a log; its id."""
    with Ledger(home / "ledger.sqlite") as ledger:
        fill(ledger, runs)
        run = next(r for r in ledger.list_runs(limit=runs) if r.state.finished)
        run_dir = home / "runs" / run.id
        (run_dir / "logs").mkdir(parents=True)
        (run_dir / "logs" / "train.log").write_text("Epoch 1/20\n" * 20 + "test loss 0.0142\n")
        ledger.update_run(run.id, run_dir=str(run_dir), handle={"training_started": True})
    return run.id


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="runs of each command (median)")
    args = parser.parse_args()
    cloudtrain = str(Path(sys.executable).parent / "cloudtrain")
    with tempfile.TemporaryDirectory(prefix="ct-startup-") as tmp:
        env = dict(os.environ, CLOUDTRAIN_HOME=tmp)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: compiled once, then read
        run_id = seed(Path(tmp), 200)
        commands = {
            "--help": ["--help"],
            "status": ["status"],
            "status --json": ["status", "--json"],
            "status RUN": ["status", run_id],
            "cost-report": ["cost-report"],
            "logs RUN": ["logs", run_id],
        }
        for argv in commands.values():  # a round not timed: the bytecode is written
            timed([cloudtrain, *argv], env)
        times: dict[str, list[float]] = {name: [] for name in ["baseline", *commands]}
        for _ in range(args.repeat):
            times["baseline"].append(timed(BASELINE, env))
            for name, argv in commands.items():
                times[name].append(timed([cloudtrain, *argv], env))
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["baseline"]
    print(f"{'baseline (import click, rich.table)':<36} {base:.3f} s")
    for name in commands:
        print(f"cloudtrain {name:<25} {median[name]:.3f} s  +{median[name] - base:.3f} s")
    worst = max(commands, key=lambda name: median[name])
    over = median[worst] - base
    met = over <= GOAL_S
    print(
        f"cli_startup: worst {worst} +{over:.3f} s over the baseline ({base:.3f} s); "
        f"goal +{GOAL_S:.2f} s: {'met' if met else 'missed'} (medians of {args.repeat})"
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
