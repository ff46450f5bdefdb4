"""The user's path, end to end in `--dry-run`: the `cloudtrain` command as installed, run from
any folder, a job whose `setup` runs `pip install -r requirements.txt`, and a run folder a
user deleted.

Nothing here reaches the internet: the package a job installs is a wheel the test makes,
installed with `--no-index`.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import yaml
from test_run_e2e import CLOUDTRAIN, live_instances, only_run, sim_image, status  # noqa: F401  (sim_image: a fixture)

from cloudtrain.settings import Settings


def cloudtrain(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLOUDTRAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def make_wheel(folder: Path, name: str, version: str, module: str, script: str) -> Path:
    """A pure-Python wheel with one module and one console script (``script`` runs ``name:main``)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": module.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: cloudtrain-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": f"[console_scripts]\n{script} = {name}:main\n".encode(),
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for path, data in files.items()
    ]
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def write_job(folder: Path, name: str, setup: str, run: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    job = {
        "name": name,
        "setup": setup,
        "run": run,
        "outputs": ["outputs/"],
        "env": {"PIP_NO_INDEX": "1"},  # never PyPI from a test
        "resources": {"gpu": "T4"},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"


def test_a_setup_that_pip_installs_trains_from_any_folder_and_the_next_job_never_sees_it(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    # The user's current folder holds a `cloudtrain/` that is not the installed package (a
    # checkout's root, where ami/ is not mapped in): nothing cloudtrain starts may import it.
    here = tmp_path / "checkout"
    (here / "cloudtrain").mkdir(parents=True)
    (here / "cloudtrain" / "__init__.py").write_text(
        "raise ImportError('imported cloudtrain from the current folder, not the installed package')\n"
    )

    first = tmp_path / "first"
    make_wheel(first / "wheels", "cttiny", "1.0", "def main():\n    print('cttiny script ran')\n", "cttiny")
    (first / "requirements.txt").write_text("./wheels/cttiny-1.0-py3-none-any.whl\n")
    train = (
        'python -c \'import cttiny, os; os.makedirs("outputs", exist_ok=True); '
        'open("outputs/where.txt", "w").write(cttiny.__file__)\''
        " && cttiny && python -m pip --version"
    )
    job = write_job(first, "pip-setup", "pip install -r requirements.txt", train)
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"), cwd=here)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = only_run(tmp_path / "runs")
    log = (run_dir / "logs" / "train.log").read_text()
    assert "Successfully installed cttiny-1.0" in log  # the job environment's own pip installed it
    assert "cttiny script ran" in log  # the console script the package brought is on PATH
    # ... into the instance's own layer, never the shared image
    installed = (run_dir / "outputs" / "outputs" / "where.txt").read_text()
    assert str(settings.home / "sim" / "instances") in installed, installed
    assert not list(sim_image.glob("envs/*/lib/python*/site-packages/cttiny*"))

    # The next job on the same image, on a new instance, does not see it. Its setup checks,
    # and it stays up (--detach) for the deleted-folder checks below.
    second = tmp_path / "second"
    absent = (
        "python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(\"cttiny\") is not None)'"
        " && ! command -v cttiny"
    )
    job = write_job(second, "next-job", absent, "python -c 'import time; time.sleep(300)'")
    out = tmp_path / "runs-next"
    detached = cloudtrain("run", str(job), "--dry-run", "--detach", "--out", str(out))
    assert detached.returncode == 0, detached.stdout + detached.stderr  # its setup passed
    run_id = only_run(out).name
    assert status(run_id)["state"] == "running"

    # A user deletes the run folder of a live run: pull and logs say what is missing.
    shutil.rmtree(only_run(out))
    for command in (("pull", run_id), ("logs", run_id), ("logs", run_id, "-f")):
        refused = cloudtrain(*command)
        assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
        assert f"run {run_id}'s folder {out / run_id} is missing" in refused.stderr, refused.stderr
        assert f"cloudtrain down {run_id}" in refused.stderr and "Traceback" not in refused.stderr
    assert cloudtrain("down", run_id).returncode == 0
    assert live_instances(settings, run_id) == []

    # A finished run's deleted folder: its log is gone with it, and logs says so.
    finished = run_dir.name
    shutil.rmtree(run_dir)
    refused = cloudtrain("logs", finished)
    assert refused.returncode == 2 and f"run {finished}'s folder" in refused.stderr, refused.stderr
