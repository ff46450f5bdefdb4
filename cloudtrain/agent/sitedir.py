"""The run's start-up hooks: RUN_DIR/site/ (its sitecustomize.py) and the variables that turn them on.

`backend --seed` and `backend --checkpoint-dir` copy runsite.py there as sitecustomize.py
(and checkpoint.py as _cloudtrain_checkpoint.py), put the folder first on PYTHONPATH,
and add the variables below to env.json; runsite.py says what each process then does.
"""

from __future__ import annotations

import os
import shutil

from .runfiles import RunPaths

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {
    "sitecustomize.py": os.path.join(HERE, "runsite.py"),
    "_cloudtrain_checkpoint.py": os.path.join(HERE, "checkpoint.py"),
}


def write_site(paths: RunPaths) -> str:
    """Copy the run's sitecustomize.py (and the checkpoint module) into RUN_DIR/site/; return it."""
    os.makedirs(paths.site_dir, exist_ok=True)
    for name, source in FILES.items():
        target = os.path.join(paths.site_dir, name)
        shutil.copyfile(source, target + ".tmp")
        os.replace(target + ".tmp", target)
    return paths.site_dir


def prepend_path(folder: str, pythonpath: str = "") -> str:
    return os.pathsep.join(p for p in (folder, pythonpath) if p)


def seed_env(seed: int) -> dict[str, str]:
    """Variables that make a run reproducible with `seed`."""
    return {
        "PYTHONHASHSEED": str(seed),
        "CLOUDTRAIN_SEED": str(seed),
        "TF_DETERMINISTIC_OPS": "1",
    }


def checkpoint_env(
    checkpoint_dir: str, every: int, notice_file: str, metrics_file: str, progress_file: str
) -> dict[str, str]:
    """Variables that make `fit` checkpoint into `checkpoint_dir` and resume from it, record
    each epoch's metrics in `metrics_file`, and where Keras's calls stand in `progress_file`."""
    return {
        "CLOUDTRAIN_CHECKPOINT_DIR": checkpoint_dir,
        "CLOUDTRAIN_CHECKPOINT_EVERY": str(every),
        "CLOUDTRAIN_NOTICE_FILE": notice_file,
        "CLOUDTRAIN_METRICS_FILE": metrics_file,
        "CLOUDTRAIN_PROGRESS_FILE": progress_file,
    }
