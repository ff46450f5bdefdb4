"""The run as ``status --json`` and ``run.json`` show it: one JSON record built from the
ledger (its rows, cost and events). Light: reading commands import it without boto3,
paramiko or the orchestrator."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from cloudtrain import budget, metrics
from cloudtrain.errors import InputError
from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.records import iso, utcnow
from cloudtrain.report import cost_report


def write_run_json(ledger: Ledger, run_id: str, run_dir: Path) -> dict[str, Any]:
    """Write the run's record to ``run_dir/run.json`` (atomically); the record."""
    record = run_record(ledger, run_id)
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(run_dir / "run.json")
    return record


def _progress(run: RunRow, instances: list[InstanceRow]) -> dict[str, Any] | None:
    """metrics.progress, with ``projected_usd``: what the run will have cost when its fit ends
    at this pace (null once it has ended)."""
    if not run.run_dir:
        return None
    progress = metrics.progress(metrics.series(Path(run.run_dir)), finished=run.state.finished)
    if progress is not None:
        eta = progress["eta_s"]
        later = utcnow() + timedelta(seconds=eta) if eta is not None else None
        progress["projected_usd"] = round(budget.spent_usd(instances, later), 4) if later else None
    return progress


def run_record(ledger: Ledger, run_id: str) -> dict[str, Any]:
    """The run as ``status --json`` and run.json show it (``"schema": 1``; added since:
    ``progress``, None until an epoch has come home (metrics.progress), and ``projected_usd``,
    the run's cost as projected after its first epoch)."""
    run = ledger.get_run(run_id)
    if run is None:
        raise InputError(f"no run {run_id}")
    instances = ledger.instances(run_id)
    cost = None
    for row in cost_report(ledger, since=run.created_at, until=run.created_at + timedelta(seconds=1)).rows:
        if row.key == run_id:
            cost = round(row.total_usd, 4)
    return {
        "schema": 1,
        "id": run.id,
        "name": run.name,
        "state": run.state.value,
        "backend": run.backend,
        "simulated": run.simulated,
        "region": run.region,
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at) if run.started_at else None,
        "ended_at": iso(run.ended_at) if run.ended_at else None,
        "exit_code": run.exit_code,
        "cost_usd": cost,
        "projected_usd": round(run.projected_usd, 4) if run.projected_usd is not None else None,
        "run_dir": run.run_dir,
        "job_path": run.job_path,
        "backend_report": run.handle.backend_report,
        "kept_until": run.handle.kept_until,
        "progress": _progress(run, instances),
        "instances": [
            {
                "id": i.id,
                "type": i.instance_type,
                "zone": i.zone,
                "lifecycle": i.lifecycle.value,
                "price_per_hour": i.price_per_hour,
                "on_demand_per_hour": i.on_demand_per_hour,
                "launched_at": iso(i.launched_at),
                "running_at": iso(i.running_at) if i.running_at else None,
                "ended_at": iso(i.terminated_at) if i.terminated_at else None,
            }
            for i in instances
        ],
        "events": [{"at": iso(e.at), "kind": e.kind, "message": e.message} for e in ledger.events(run_id)],
    }
