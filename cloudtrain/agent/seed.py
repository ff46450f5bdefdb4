"""Seeding a run: the environment variables and the sitecustomize.py that `--seed` adds."""

from __future__ import annotations

import os
import shutil

from .runfiles import RunPaths

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seedsite.py")


def write_seed_site(paths: RunPaths) -> str:
    """Copy the seeding sitecustomize.py into RUN_DIR/seed/; return that folder."""
    os.makedirs(paths.seed_dir, exist_ok=True)
    target = os.path.join(paths.seed_dir, "sitecustomize.py")
    shutil.copyfile(TEMPLATE, target + ".tmp")
    os.replace(target + ".tmp", target)
    return paths.seed_dir


def seed_env(seed: int, seed_dir: str, pythonpath: str = "") -> dict[str, str]:
    """Variables that make a run reproducible with `seed`."""
    return {
        "PYTHONHASHSEED": str(seed),
        "CLOUDTRAIN_SEED": str(seed),
        "TF_DETERMINISTIC_OPS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (seed_dir, pythonpath) if p),
    }
