"""The opt-in check on REAL AWS, never in CI: ``CLOUDTRAIN_AWS_TESTS=1 tox -e aws``.

It spends real money (cents for the smoke test; the training job is capped by its
budget, $1 and 1 h) and needs credentials allowed what ``cloudtrain iam-policy`` prints.
Without CLOUDTRAIN_AWS_TESTS=1 it refuses to start (exit 2), whatever else is set.

1. ``cloudtrain doctor --launch --yes``: a spot t3.micro through a run's control path;
2. ``cloudtrain run jobs/digits-mlp/job.yaml --yes``: one tiny real training job on a GPU
   spot instance (it needs the cloudtrain image in the region: ``cloudtrain image build``).

Not a pytest module (its name does not start with test_): nothing collects it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    if os.environ.get("CLOUDTRAIN_AWS_TESTS") != "1":
        print(
            "real_aws.py: this spends money on real AWS; set CLOUDTRAIN_AWS_TESTS=1 to run it "
            "(`CLOUDTRAIN_AWS_TESTS=1 tox -e aws`).",
            file=sys.stderr,
        )
        return 2
    steps = [
        ["cloudtrain", "doctor", "--launch", "--yes"],
        ["cloudtrain", "run", str(REPO / "jobs" / "digits-mlp" / "job.yaml"), "--yes", "--plain"],
        ["cloudtrain", "cost-report"],
    ]
    for command in steps:
        print(f"\n== {' '.join(command)}", flush=True)
        code = subprocess.run(command, cwd=REPO).returncode
        if code != 0:
            print(f"real_aws.py: `{' '.join(command)}` exited {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
