"""Writes tests/data/ledger-v1/ledger.sqlite with cloudtrain at 00fb72b (ledger schema 1).

    git worktree add /tmp/old 00fb72b
    PYTHONPATH=/tmp/old python tests/data/ledger-v1/make.py tests/data/ledger-v1/ledger.sqlite

status.json holds what that version's `cloudtrain status --json` and `status RUN --json`
printed for it (CLOUDTRAIN_HOME at a copy); tests/test_cli.py checks that today's
prints the same after migrating it.
"""

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.records import Lifecycle, RunState

out = Path(sys.argv[1])
out.unlink(missing_ok=True)
T = datetime(2026, 11, 30, 9, 0, tzinfo=timezone.utc)
report = {
    "backend": "theano",
    "devices": ["cuda0: Tesla T4"],
    "framework": "theano",
    "framework_version": "1.0.5",
    "keras_version": "2.3.1",
    "ok": True,
}
plan = {
    "offers": [{"instance_type": "g4dn.xlarge", "zone": "us-east-1a", "spot": 0.1578, "on_demand": 0.526}]
}
with Ledger(out) as led:
    runs = [
        (
            "mnist-cnn-20261130-090000-a1b2",
            "mnist-cnn",
            RunState.SUCCEEDED,
            0,
            {
                "plan": plan,
                "owner": "alice@laptop",
                "image": "ami-0abc",
                "security_group_id": "sg-01",
                "key_name": "cloudtrain-mnist-cnn-20261130-090000-a1b2",
                "key_path": "/home/alice/.cloudtrain/keys/k.pem",
                "instance_profile": "cloudtrain-mnist-cnn-20261130-090000-a1b2",
                "instance_id": "i-0000000000000002",
                "ssh": {
                    "host": "203.0.113.7",
                    "port": 22,
                    "user": "ubuntu",
                    "fingerprints": ["SHA256:abc", "SHA256:def"],
                },
                "backend_report": report,
                "training_started": True,
                "log_base": 5120,
                "relaunches": 1,
            },
        ),
        (
            "kept-20261130-100000-c3d4",
            "kept",
            RunState.SUCCEEDED,
            0,
            {
                "instance_id": "i-0000000000000003",
                "kept_until": "2026-12-01T10:00:00Z",
                "training_started": True,
                "backend_report": report,
            },
        ),
        (
            "broken-20261130-110000-e5f6",
            "broken",
            RunState.FAILED,
            1,
            {"instance_id": "i-0000000000000004", "training_started": False, "log_base": 0, "relaunches": 0},
        ),
        (
            "image-build-20261130-120000-0007",
            "image-build",
            RunState.SUCCEEDED,
            0,
            {
                "image_version": "7",
                "instance_type": "g4dn.xlarge",
                "key_name": "kb",
                "security_group_id": "sg-9",
                "key_path": "/k",
                "base_image": "ami-base",
                "instance_id": "i-0000000000000005",
                "backend_reports": {"tensorflow": report},
                "image_id": "ami-new",
                "image_name": "cloudtrain-7-x",
            },
        ),
    ]
    n = 0
    for k, (run_id, name, state, code, detail) in enumerate(runs):
        start = T + timedelta(hours=k)
        led.create_run(
            RunRow(
                run_id,
                name,
                state,
                start,
                job_path=f"/home/alice/{name}/job.yaml",
                backend="theano",
                simulated=k == 2,
                region="us-east-1",
                started_at=start + timedelta(minutes=2),
                ended_at=start + timedelta(minutes=50),
                run_dir=f"/home/alice/runs/{run_id}",
                exit_code=code,
                detail=detail,
            )
        )
        for j in range(2 if k == 0 else 1):
            n += 1
            led.record_instance(
                InstanceRow(
                    f"i-{n:016d}",
                    run_id,
                    "g4dn.xlarge",
                    "us-east-1a",
                    Lifecycle.SPOT,
                    0.1578,
                    0.526,
                    start + timedelta(minutes=1 + 20 * j),
                    disk_gb=100,
                    ebs_per_gb_month=0.08,
                    running_at=start + timedelta(minutes=2 + 20 * j),
                    terminated_at=start + timedelta(minutes=20 + 30 * j),
                )
            )
        led.add_event(run_id, "state", f"{name}: {state.value}", at=start + timedelta(minutes=50))
