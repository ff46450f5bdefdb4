"""Benchmark: cost reports over a large ledger must take well under a second.

    python benchmarks/ledger_bench.py [--runs 100000] [--repeat 3]

Fills a temporary ledger with N runs spread over 90 days (about 10% relaunched on a
second instance, 20% simulated, a few never reaching running, the newest still
running), then times, in this one process, the reports the CLI produces: the table
(``cost_report`` with the default limit), the csv and json exports of every run
(``export``), and the per-day and per-instance-type reports. Each operation runs
``--repeat`` times; the slowest time counts. The last line is the verdict against the
1.0 s target.

The fill inserts with plain SQL in one transaction (the ledger's triggers keep the run
summaries, as they do for ``Ledger.record_instance``), so it takes a while.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloudtrain.ledger import Ledger  # noqa: E402
from cloudtrain.records import Lifecycle, RunState, iso  # noqa: E402
from cloudtrain.report import cost_report, export  # noqa: E402

TARGET_S = 1.0
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
TYPES = [  # (type, on-demand $/h)
    ("g4dn.xlarge", 0.526),
    ("g4dn.2xlarge", 0.752),
    ("g5.xlarge", 1.006),
    ("g5.2xlarge", 1.212),
    ("p3.2xlarge", 3.06),
    ("g6.xlarge", 0.805),
]
ZONES = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"]


def fill(ledger: Ledger, n_runs: int, seed: int = 7) -> int:
    """Insert ``n_runs`` runs and their instances in one transaction; returns instances."""
    rng = random.Random(seed)
    start = NOW - timedelta(days=90)
    step = timedelta(days=90) / max(n_runs, 1)
    runs: list[tuple[object, ...]] = []
    instances: list[tuple[object, ...]] = []
    for i in range(n_runs):
        created = start + step * i
        run_id = f"job{i % 97}-{created:%Y%m%d-%H%M%S}-{i:06x}"
        simulated = i % 5 == 0
        still_running = i >= n_runs - 20
        state = (
            RunState.RUNNING
            if still_running
            else rng.choice([RunState.SUCCEEDED] * 8 + [RunState.FAILED, RunState.CANCELLED])
        )
        started = created + timedelta(seconds=rng.randint(30, 300))
        t = started
        n_instances = 2 if i % 10 == 3 else 1
        for k in range(n_instances):
            itype, on_demand = rng.choice(TYPES)
            spot = rng.random() < 0.85
            price = on_demand * (rng.uniform(0.3, 0.45) if spot else 1.0)
            never_ran = rng.random() < 0.01
            running = None if never_ran else t + timedelta(seconds=rng.randint(20, 120))
            duration = timedelta(seconds=rng.randint(30, 6 * 3600))
            last = k == n_instances - 1
            terminated = None if (still_running and last) else (running or t) + duration
            instances.append(
                (
                    f"i-{i:08x}{k:02x}{rng.getrandbits(28):07x}",
                    run_id,
                    itype,
                    rng.choice(ZONES),
                    (Lifecycle.SPOT if spot else Lifecycle.ON_DEMAND).value,
                    round(price, 4),
                    on_demand,
                    rng.choice([50, 100, 200]),
                    0.08,
                    iso(t),
                    iso(running) if running else None,
                    iso(terminated) if terminated else None,
                )
            )
            t = terminated or t
        ended = None if still_running else t
        runs.append(
            (
                run_id,
                f"job{i % 97}",
                f"/home/me/jobs/job{i % 97}.yaml",
                rng.choice(["tensorflow", "theano"]),
                state.value,
                int(simulated),
                "us-east-1",
                iso(created),
                iso(started),
                iso(ended) if ended else None,
                f"/home/me/.cloudtrain/runs/{run_id}",
                None if still_running else (0 if state is RunState.SUCCEEDED else 1),
                json.dumps({"relaunches": n_instances - 1, "instance_type": "g4dn.xlarge"}),
            )
        )
    conn = ledger.connection
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO runs (id, name, job_path, backend, state, simulated, region,"
            " created_at, started_at, ended_at, run_dir, exit_code, handle)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            runs,
        )
        conn.executemany(
            "INSERT INTO instances (id, run_id, instance_type, zone, lifecycle,"
            " price_per_hour, on_demand_per_hour, disk_gb, ebs_per_gb_month, launched_at,"
            " running_at, terminated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            instances,
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("ANALYZE")
    return len(instances)


def timed(label: str, fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(f"{label:<48} worst {max(times):.3f} s  best {min(times):.3f} s")
    return max(times)


def checks(ledger: Ledger) -> list[tuple[str, Callable[[], object]]]:
    """The timed operations: what ``cloudtrain cost-report`` and ``status`` run."""
    return [
        ("cost_report(group_by=run, limit=50)", lambda: cost_report(ledger, limit=50, now=NOW)),
        ("export(csv), every run", lambda: export(ledger, "csv", now=NOW)),
        ("export(json), every run", lambda: export(ledger, "json", now=NOW)),
        ("cost_report(group_by=day)", lambda: cost_report(ledger, group_by="day", now=NOW)),
        (
            "cost_report(group_by=instance-type)",
            lambda: cost_report(ledger, group_by="instance-type", now=NOW),
        ),
        ("list_runs(limit=20)", lambda: ledger.list_runs(limit=20)),
        ("list_runs(active_only=True)", lambda: ledger.list_runs(active_only=True)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    repeat = max(1, args.repeat)

    with (
        tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp,
        Ledger(Path(tmp) / "state" / "ledger.sqlite") as ledger,
    ):
        t0 = time.perf_counter()
        n_instances = fill(ledger, args.runs)
        print(f"filled {args.runs} runs, {n_instances} instances in {time.perf_counter() - t0:.2f} s")
        worst = max(timed(label, fn, repeat) for label, fn in checks(ledger))

    print(
        f"ledger_bench: worst {worst:.3f} s for {args.runs} runs;"
        f" ratio to the {TARGET_S} s target: {worst / TARGET_S:.3f}"
        + ("" if worst <= TARGET_S else " (over the target)")
    )
    return 0 if worst <= TARGET_S else 1  # a script or CI can tell a miss from a pass


if __name__ == "__main__":
    raise SystemExit(main())
