"""The on-instance agent (cloudtrain/agent): every command as a subprocess, run both by
the controller's Python (`python -m cloudtrain.agent`) and by Python 3.7 as the uploaded
package (`python3.7 -m cloudtrain_agent`), the way the instance runs it.

Jobs are plain `python -c` / `sh` stand-ins; Keras, TensorFlow and numpy are small fakes.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import py_compile
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import needs
import pytest

REPO = Path(__file__).resolve().parents[1]
AGENT_SRC = REPO / "cloudtrain" / "agent"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
AGENT_MODULES = {"cli.py", "supervisor.py", "checkpoint.py", "receive.py", "pack.py", "runsite.py"}


class Agent:
    """Runs the agent CLI as a subprocess, with a clean environment and a private HOME."""

    def __init__(self, python: str, argv: list[str], cwd: Path, tmp: Path, env: dict[str, str]) -> None:
        self.python = python
        self.argv = argv
        self.cwd = cwd
        self.tmp = tmp
        self.env = env
        self.run_dirs: list[Path] = []

    def run(
        self, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        full_env = dict(self.env, **(env or {}))
        return subprocess.run(
            self.argv + list(args),
            input=stdin,
            capture_output=True,
            cwd=self.cwd,
            env=full_env,
            timeout=timeout,
        )

    def json(self, *args: str, expect: int = 0, **kwargs: Any) -> dict[str, Any]:
        proc = self.run(*args, **kwargs)
        assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stdout.decode().strip().splitlines()
        assert len(lines) == 1, proc.stdout  # exactly one JSON object
        obj = json.loads(lines[0])
        assert isinstance(obj, dict)
        return obj

    def backend(self, backend: str, home: Path, run_dir: Path, *extra: str, **kwargs: Any) -> dict[str, Any]:
        """`backend --backend BACKEND --home HOME --run-dir RUN_DIR [extra]`: its JSON."""
        return self.json(
            "backend", "--backend", backend, "--home", str(home), "--run-dir", str(run_dir), *extra, **kwargs
        )

    def start(self, run_dir: Path, run: str, *extra: str, secrets: bytes = b"") -> dict[str, Any]:
        self.run_dirs.append(run_dir)
        workdir = self.tmp / "work"
        workdir.mkdir(exist_ok=True)
        args = ["start", "--run-dir", str(run_dir), "--workdir", str(workdir), "--run", run, *extra]
        return self.json(*args, stdin=secrets)

    def py(self, code: str) -> str:
        """A shell command running `code` with the agent's Python (a training stand-in)."""
        return f"{shlex.quote(self.python)} -c {shlex.quote(code)}"

    def cleanup(self) -> None:
        """Kill whatever a failed test left running."""
        for run_dir in self.run_dirs:
            state = read_state(run_dir)
            for key, kill in (("pgid", os.killpg), ("supervisor_pid", os.kill)):
                target = state.get(key)
                if isinstance(target, int) and target > 1:
                    with contextlib.suppress(OSError):
                        kill(target, signal.SIGKILL)


@pytest.fixture(params=["current", "py37"])
def agent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Agent]:
    """The agent under the controller's Python, and as `cloudtrain_agent` under Python 3.7."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "CLOUDTRAIN_TESTING": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if request.param == "current":
        env["PYTHONPATH"] = str(REPO)
        a = Agent(sys.executable, [sys.executable, "-m", "cloudtrain.agent"], REPO, tmp_path, env)
    else:
        python37 = needs.python37()
        where = tmp_path / "uploaded"
        shutil.copytree(AGENT_SRC, where / "cloudtrain_agent", ignore=shutil.ignore_patterns("__pycache__"))
        a = Agent(python37, [python37, "-m", "cloudtrain_agent"], where, tmp_path, env)
    try:
        yield a
    finally:
        a.cleanup()


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        obj = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    assert isinstance(obj, dict)
    return obj


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_finished(run_dir: Path, timeout: float = 10.0) -> int:
    wait_for(lambda: (run_dir / "exit_code").exists(), timeout, "exit_code")
    return int((run_dir / "exit_code").read_text())


def write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def job_env(agent: Agent, env_file: Path) -> dict[str, str]:
    env = {"PATH": agent.env["PATH"], "LANG": "C.UTF-8"}
    env.update(json.loads(env_file.read_text()))
    return env


# --- backend ---------------------------------------------------------------------------------


KERAS_JSON = {"epsilon": 1e-07, "floatx": "float32", "image_data_format": "channels_last"}


def test_backend_tensorflow_cpu(agent: Agent, tmp_path: Path) -> None:
    home, run = tmp_path / "job-home", tmp_path / "run"
    out = agent.backend("tensorflow", home, run, "--gpu", "no")
    assert json.loads((home / ".keras" / "keras.json").read_text()) == dict(KERAS_JSON, backend="tensorflow")
    assert not (home / ".theanorc").exists()
    env = json.loads((run / "env.json").read_text())
    assert env == {
        "KERAS_BACKEND": "tensorflow",
        "KERAS_HOME": str(home / ".keras"),
        "HOME": str(home),
        "PYTHONUNBUFFERED": "1",
    }
    assert out["env"] == env and out["gpu"] is False
    assert out["keras_json"] == str(home / ".keras" / "keras.json") and out["theanorc"] is None
    assert out["env_file"] == str(run / "env.json") and out["site_dir"] is None and out["checkpoint"] is None


@pytest.mark.parametrize(("gpu", "device"), [("yes", "cuda"), ("no", "cpu")])
def test_backend_theano(agent: Agent, tmp_path: Path, gpu: str, device: str) -> None:
    home, run = tmp_path / "job-home", tmp_path / "run"
    out = agent.backend("theano", home, run, "--gpu", gpu)
    assert json.loads((home / ".keras" / "keras.json").read_text()) == dict(KERAS_JSON, backend="theano")
    assert (home / ".theanorc").read_text() == f"[global]\ndevice = {device}\nfloatX = float32\n"
    env = json.loads((run / "env.json").read_text())
    assert env["KERAS_BACKEND"] == "theano"
    assert env["THEANO_FLAGS"] == f"device={device},floatX=float32,base_compiledir={home / '.theano'}"
    assert out["gpu"] is (gpu == "yes") and out["theanorc"] == str(home / ".theanorc")
    # The job's own THEANO_FLAGS follow ours, so they win (Theano reads the last value).
    out = agent.backend(
        "theano", home, run, "--gpu", gpu, "--env", "THEANO_FLAGS=dnn.conv.algo_bwd_filter=deterministic"
    )
    assert out["env"]["THEANO_FLAGS"].endswith(
        f"base_compiledir={home / '.theano'},dnn.conv.algo_bwd_filter=deterministic"
    )


@pytest.mark.parametrize(
    ("script", "gpu"),
    [
        ("echo 'GPU 0: Tesla T4 (UUID: GPU-8a3b)'", True),
        (
            "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9",
            False,
        ),
    ],
)
def test_backend_gpu_auto_asks_nvidia_smi(agent: Agent, tmp_path: Path, script: str, gpu: bool) -> None:
    bin_dir = tmp_path / "bin"
    write_script(bin_dir / "nvidia-smi", f"#!/bin/sh\n{script}\n")
    home, run = tmp_path / "job-home", tmp_path / "run"
    out = agent.backend("theano", home, run, env={"PATH": f"{bin_dir}:{agent.env['PATH']}"})
    assert out["gpu"] is gpu and out["gpu_mode"] == "auto"
    assert out["gpus"] == (["GPU 0: Tesla T4 (UUID: GPU-8a3b)"] if gpu else [])
    assert f"device = {'cuda' if gpu else 'cpu'}" in (home / ".theanorc").read_text()


def test_backend_keras_versions(agent: Agent, tmp_path: Path) -> None:
    home, run = tmp_path / "job-home", tmp_path / "run"
    common = ["--home", str(home), "--run-dir", str(run), "--gpu", "no"]
    agent.json("backend", "--backend", "tensorflow", "--keras", "2", *common)
    assert json.loads((run / "env.json").read_text())["TF_USE_LEGACY_KERAS"] == "1"
    agent.json("backend", "--backend", "tensorflow", "--keras", "3", *common)
    assert "TF_USE_LEGACY_KERAS" not in json.loads((run / "env.json").read_text())
    err = agent.json("backend", "--backend", "theano", "--keras", "3", *common, expect=2)
    assert "Theano" in err["error"] and err["hint"]


@pytest.mark.parametrize(("keras", "version", "is_tf_keras"), [("2", "2.99.0", True), ("3", "3.99.0", False)])
def test_keras_2_on_tensorflow_makes_import_keras_tf_keras(
    agent: Agent, tmp_path: Path, keras: str, version: str, is_tf_keras: bool
) -> None:
    fakes = fake_modules(tmp_path / "fakes")
    run = tmp_path / "run"
    agent.backend(
        "tensorflow", tmp_path / "h", run, "--gpu", "no", "--keras", keras, "--env", f"PYTHONPATH={fakes}"
    )
    probe = (
        "import keras, keras.models, tf_keras, tf_keras.models\n"
        "from keras.models import Sequential\n"
        "print(keras.__version__, keras is tf_keras, keras.models is tf_keras.models,"
        " Sequential is tf_keras.models.Sequential)"
    )
    if not is_tf_keras:
        probe = "import keras\nprint(keras.__version__, False, False, False)"
    out = subprocess.run(
        [agent.python, "-c", probe], env=job_env(agent, run / "env.json"), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [version] + [str(is_tf_keras)] * 3


def test_theano_compile_folder_starts_as_a_copy_of_the_image_cache(agent: Agent, tmp_path: Path) -> None:
    cache = tmp_path / "image" / "theano-cache"
    (cache / "compiledir_x" / "tmpabc").mkdir(parents=True)
    (cache / "compiledir_x" / "tmpabc" / "mod.so").write_bytes(b"compiled")
    home, run = tmp_path / "job-home", tmp_path / "run"
    out = agent.backend("theano", home, run, "--gpu", "no", "--compile-cache", str(cache))
    assert out["compile_cache"] == str(cache)
    copied = home / ".theano" / "compiledir_x" / "tmpabc" / "mod.so"
    assert copied.read_bytes() == b"compiled" and not copied.is_symlink()
    copied.write_bytes(b"recompiled by the run")  # the run writes its own copy, never the image
    assert (cache / "compiledir_x" / "tmpabc" / "mod.so").read_bytes() == b"compiled"
    again = agent.backend("theano", home, run, "--gpu", "no", "--compile-cache", str(cache))
    assert again["compile_cache"] is None and copied.read_bytes() == b"recompiled by the run"
    fresh = agent.backend(
        "theano", tmp_path / "h2", tmp_path / "r2", "--gpu", "no", "--compile-cache", str(tmp_path / "none")
    )
    assert fresh["compile_cache"] is None and not (tmp_path / "h2" / ".theano").exists()


def test_backend_seed_seeds_random_without_importing_tensorflow(agent: Agent, tmp_path: Path) -> None:
    home, run = tmp_path / "job-home", tmp_path / "run"
    agent.backend("tensorflow", home, run, "--gpu", "no", "--seed", "42")
    env = json.loads((run / "env.json").read_text())
    assert env["PYTHONHASHSEED"] == "42" and env["CLOUDTRAIN_SEED"] == "42"
    assert env["TF_DETERMINISTIC_OPS"] == "1"
    assert env["PYTHONPATH"] == str(run / "site")
    assert (run / "site" / "sitecustomize.py").is_file()
    assert "CLOUDTRAIN_CHECKPOINT_DIR" not in env
    probe = "import random, sys; print(random.random()); print(sorted({'tensorflow', 'numpy', 'keras'} & set(sys.modules)))"
    outs = [
        subprocess.run(
            [agent.python, "-c", probe],
            env=job_env(agent, run / "env.json"),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for _ in range(2)
    ]
    assert outs[0] == outs[1]
    number, imported = outs[0].splitlines()
    assert float(number) == random.Random(42).random()
    assert imported == "[]"


FAKE_MODULES = {
    "numpy/__init__.py": "from . import random\n",
    "numpy/random.py": "seeded = None\ndef seed(s):\n    global seeded\n    seeded = s\n",
    "tensorflow/__init__.py": "__version__ = '2.99.0'\nfrom . import random, config\n",
    "tensorflow/random.py": "seeded = None\ndef set_seed(s):\n    global seeded\n    seeded = s\n",
    "tensorflow/config.py": (
        "import os\nclass _Dev:\n    def __init__(self, name):\n        self.name = name\n"
        "def list_physical_devices(kind):\n"
        "    return [_Dev('/physical_device:GPU:0')] if os.environ.get('FAKE_TF_GPU') else []\n"
    ),
    "keras/__init__.py": "__version__ = '3.99.0'\nfrom . import utils, backend\n",
    "keras/utils.py": "seeded = None\ndef set_random_seed(s):\n    global seeded\n    seeded = s\n",
    "keras/backend.py": "import os\ndef backend():\n    return os.environ.get('KERAS_BACKEND')\n",
    "tf_keras/__init__.py": "__version__ = '2.99.0'\nfrom . import utils, backend\n",
    "tf_keras/utils.py": "seeded = None\ndef set_random_seed(s):\n    global seeded\n    seeded = s\n",
    "tf_keras/backend.py": "def backend():\n    return 'tensorflow'\n",
    "tf_keras/models.py": "class Sequential:\n    pass\n",
    "theano/__init__.py": "__version__ = '1.0.5'\nfrom . import config\n",
    "theano/config.py": "device = 'cpu'\n",
}


def fake_modules(where: Path) -> Path:
    for name, text in FAKE_MODULES.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(text)
    return where


def test_seed_hook_seeds_numpy_tensorflow_and_keras_when_imported(agent: Agent, tmp_path: Path) -> None:
    fakes = fake_modules(tmp_path / "fakes")
    home, run = tmp_path / "job-home", tmp_path / "run"
    agent.backend(
        "tensorflow",
        home,
        run,
        "--gpu",
        "no",
        "--seed",
        "7",
        "--env",
        f"PYTHONPATH={fakes}",
        "--env",
        "JOB_VAR=x",
    )
    env = json.loads((run / "env.json").read_text())
    assert env["PYTHONPATH"] == f"{run / 'site'}:{fakes}" and env["JOB_VAR"] == "x"
    probe = (
        "import sys, json\n"
        "before = 'tensorflow' in sys.modules or 'numpy' in sys.modules\n"
        "import numpy, tensorflow, keras\n"
        "print(json.dumps([before, numpy.random.seeded, tensorflow.random.seeded, keras.utils.seeded]))\n"
    )
    out = subprocess.run(
        [agent.python, "-c", probe], env=job_env(agent, run / "env.json"), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, 7, 7, 7]


def test_backend_checkpoint_dir_wraps_fit_of_keras_when_imported(agent: Agent, tmp_path: Path) -> None:
    fakes = fake_modules(tmp_path / "fakes")
    (fakes / "keras" / "__init__.py").write_text(
        "__version__ = '3.99.0'\nfrom . import utils, backend, callbacks\n"
        "class Model:\n"
        "    def fit(self, x=None, y=None, epochs=1, callbacks=None, initial_epoch=0):\n"
        "        return (epochs, initial_epoch, len(callbacks or []))\n"
    )
    (fakes / "keras" / "callbacks.py").write_text("class Callback:\n    pass\n")
    home, run, ckpt = tmp_path / "job-home", tmp_path / "run", tmp_path / "ckpt"
    extra = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "3", "--env", f"PYTHONPATH={fakes}"]
    url = "s3://bucket/prefix/run-1/"
    s3 = ["--checkpoint-s3", url, "--region", "eu-west-1"]
    out = agent.backend("tensorflow", home, run, "--gpu", "no", *extra, *s3)
    notice = str(run / "notice.json")
    assert out["checkpoint"] == {"dir": str(ckpt), "every": 3, "notice_file": notice, "s3": url}
    assert out["site_dir"] == str(run / "site") and out["seed"] is None and ckpt.is_dir()
    env = json.loads((run / "env.json").read_text())
    assert env["CLOUDTRAIN_CHECKPOINT_DIR"] == str(ckpt) and env["CLOUDTRAIN_CHECKPOINT_EVERY"] == "3"
    assert env["CLOUDTRAIN_NOTICE_FILE"] == notice and "CLOUDTRAIN_SEED" not in env
    assert env["CLOUDTRAIN_CHECKPOINT_S3"] == url and env["CLOUDTRAIN_CHECKPOINT_S3_REGION"] == "eu-west-1"
    assert env["PYTHONPATH"] == f"{run / 'site'}:{fakes}"
    assert sorted(p.name for p in (run / "site").iterdir()) == [
        "_cloudtrain_checkpoint.py",
        "sitecustomize.py",
    ]
    probe = (
        "import sys\n"
        "heavy = sorted({'keras', 'numpy', 'tensorflow', '_cloudtrain_checkpoint'} & set(sys.modules))\n"
        "import keras\n"
        "print(heavy, keras.Model().fit(None, epochs=5))\n"
    )
    done = subprocess.run(
        [agent.python, "-c", probe], env=job_env(agent, run / "env.json"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    # Nothing heavy at start-up (the checkpoint module itself is standard library only);
    # fit gets one more callback, and with no checkpoint yet starts at epoch 1.
    assert done.stdout.strip() == "['_cloudtrain_checkpoint'] (5, 0, 1)"
    assert done.stderr == f"[cloudtrain] checkpoint: none yet in {ckpt}: fit 0 starts at epoch 1\n"

    bad = agent.json(
        "backend",
        "--backend",
        "tensorflow",
        "--home",
        str(home),
        "--run-dir",
        str(run),
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-every",
        "0",
        expect=2,
    )
    assert "--checkpoint-every must be 1 or more" in bad["error"]


# TensorFlow, as far as the hooks are concerned: `import tensorflow` probes for Keras with
# importlib.util.find_spec (module_util.get_parent_dir_for_name, to lay out `tf.keras`) and
# throws the spec away; `tf.keras` imports tf_keras (TF_USE_LEGACY_KERAS=1) or keras only
# when first used (its _KerasLazyLoader).
FAKE_TENSORFLOW = """\
import importlib, importlib.util, os, types
for _name in ("keras", "tf_keras"):
    importlib.util.find_spec(_name)
class _KerasLazyLoader(types.ModuleType):
    def __getattr__(self, item):
        legacy = os.environ.get("TF_USE_LEGACY_KERAS") == "1"
        return getattr(importlib.import_module("tf_keras" if legacy else "keras"), item)
keras = _KerasLazyLoader("keras")
"""
FAKE_FIT = (
    "class Model:\n"
    "    def fit(self, x=None, y=None, epochs=1, callbacks=None, initial_epoch=0):\n"
    "        return (epochs, initial_epoch, len(callbacks or []))\n"
)


@pytest.mark.parametrize("keras", ["2", "3"])
@pytest.mark.parametrize(
    "reach",
    [
        "import keras as k",
        "from tensorflow import keras as k",
        "import tensorflow as tf; k = tf.keras",
        "import tf_keras as k",
    ],
)
def test_fit_is_wrapped_however_the_script_reaches_keras(
    agent: Agent, tmp_path: Path, keras: str, reach: str
) -> None:
    fakes = fake_modules(tmp_path / "fakes")
    (fakes / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    (fakes / "keras" / "__init__.py").write_text(
        "__version__ = '3.99.0'\nfrom . import backend, callbacks\n" + FAKE_FIT
    )
    (fakes / "tf_keras" / "__init__.py").write_text(
        "__version__ = '2.99.0'\nfrom . import backend, callbacks\n" + FAKE_FIT
    )
    for package in ("keras", "tf_keras"):
        (fakes / package / "callbacks.py").write_text("class Callback:\n    pass\n")
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    extra = ["--keras", keras, "--checkpoint-dir", str(ckpt), "--env", f"PYTHONPATH={fakes}"]
    agent.backend("tensorflow", tmp_path / "job-home", run, "--gpu", "no", *extra)
    probe = f"import sys\n{reach}\nprint(k.Model().fit(None, epochs=5), k.Model.__module__, k.__version__)\n"
    done = subprocess.run(
        [agent.python, "-c", probe], env=job_env(agent, run / "env.json"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    flavour = "tf_keras 2.99.0" if keras == "2" or "tf_keras" in reach else "keras 3.99.0"
    assert done.stdout.strip() == f"(5, 0, 1) {flavour}"  # one more callback: fit was wrapped
    assert done.stderr == f"[cloudtrain] checkpoint: none yet in {ckpt}: fit 0 starts at epoch 1\n"


# --- start, status, tail, stop ------------------------------------------------------------------


# A run that prints "begin", then waits (at most 20 s) for the test to create `release`.
GATED = (
    "import os, time\n"
    "print('begin')\n"
    "deadline = time.time() + 20\n"
    "while not os.path.exists('release') and time.time() < deadline:\n"
    "    time.sleep(0.02)\n"
    "print('end')\n"
)


def test_start_returns_at_once_and_supervises_setup_and_run(agent: Agent, tmp_path: Path) -> None:
    run = tmp_path / "run"
    began = time.monotonic()
    out = agent.start(run, agent.py(GATED), "--setup", "echo preparing")
    assert time.monotonic() - began < 5  # start does not wait for the run, which waits for us
    assert isinstance(out["pid"], int) and out["log"] == str(run / "train.log")
    wait_for(lambda: "begin" in (run / "train.log").read_text(), what="the run to begin")
    status = agent.json("status", "--run-dir", str(run))
    assert status["running"] is True and status["exit_code"] is None and status["ended_at"] is None
    assert status["phase"] == "run" and status["setup_exit_code"] == 0
    assert not (run / "exit_code").exists()

    (tmp_path / "work" / "release").touch()
    assert wait_finished(run) == 0
    log = (run / "train.log").read_text()
    assert log.index("[cloudtrain] setup: echo preparing\npreparing\n") < log.index("[cloudtrain] run: ")
    assert "begin\nend\n" in log and "[cloudtrain] run exited with code 0" in log

    status = agent.json("status", "--run-dir", str(run))
    assert status["phase"] == "done" and status["running"] is False and status["exit_code"] == 0
    assert status["log_bytes"] == (run / "train.log").stat().st_size
    assert ISO_UTC.match(status["started_at"]) and ISO_UTC.match(status["ended_at"])
    assert status["supervisor_pid"] == out["pid"] and status["lost"] is False
    state = read_state(run)
    assert state["phase"] == "done" and state["exit_code"] == 0 and state["setup_exit_code"] == 0
    assert state["pgid"] == state["pid"]  # the run had a process group of its own


def test_failing_run_records_its_exit_code(agent: Agent, tmp_path: Path) -> None:
    run = tmp_path / "run"
    agent.start(run, agent.py("import sys; print(1); sys.exit(7)"))
    assert wait_finished(run) == 7
    assert "1\n[cloudtrain] run exited with code 7\n" in (run / "train.log").read_text()
    status = agent.json("status", "--run-dir", str(run))
    assert status["exit_code"] == 7 and status["phase"] == "done"
    assert read_state(run)["run_exit_code"] == 7


def test_failing_setup_skips_the_run(agent: Agent, tmp_path: Path) -> None:
    run = tmp_path / "run"
    agent.start(run, "echo SHOULD-NOT-RUN", "--setup", "echo setting up; exit 3")
    assert wait_finished(run) == 3
    log = (run / "train.log").read_text()
    assert "[cloudtrain] setup: " in log and "setup exited with code 3" in log and "run skipped" in log
    assert "[cloudtrain] run: " not in log and "SHOULD-NOT-RUN" not in log
    state = read_state(run)
    assert state["setup_exit_code"] == 3 and state["run_exit_code"] is None and state["exit_code"] == 3


def test_supervisor_survives_its_parent_being_killed(agent: Agent, tmp_path: Path) -> None:
    run, workdir, out = tmp_path / "run", tmp_path / "work", tmp_path / "start.out"
    workdir.mkdir()
    agent.run_dirs.append(run)
    command = shlex.join(
        agent.argv
        + [
            "start",
            "--run-dir",
            str(run),
            "--workdir",
            str(workdir),
            "--run",
            agent.py(GATED),
        ]
    )
    # The parent stands for the SSH session: it stays after `start` returns, then dies.
    parent = subprocess.Popen(
        ["/bin/sh", "-c", f"{command} </dev/null >{shlex.quote(str(out))} 2>&1; sleep 30"],
        cwd=agent.cwd,
        env=agent.env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: out.exists() and out.read_text().strip(), what="start's output")
        supervisor = json.loads(out.read_text())["pid"]
        assert os.getsid(supervisor) != os.getsid(parent.pid)  # a session of its own
        wait_for(lambda: "begin" in (run / "train.log").read_text(), what="the run to begin")
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
    assert parent.returncode == -signal.SIGKILL
    (workdir / "release").touch()
    assert wait_finished(run) == 0
    assert "begin\nend\n" in (run / "train.log").read_text()


def test_secrets_reach_the_run_but_no_file_not_even_the_log(agent: Agent, tmp_path: Path) -> None:
    secret = "tok-5ecret-value-91"
    masked = "*" * len(secret)
    home, run = tmp_path / "job-home", tmp_path / "run"
    agent.backend("tensorflow", home, run, "--gpu", "no", "--seed", "1")
    out = agent.start(
        run,
        # printed whole, then split across two writes half a second apart, then on stderr
        'echo "token=$TOKEN home=$HOME backend=$KERAS_BACKEND"; printf "split=%s" "${TOKEN%value-91}";'
        ' sleep 0.5; printf "value-91 done\\n"; echo "err=$TOKEN" >&2',
        "--setup",
        "echo setup sees ${TOKEN:+a token} $TOKEN",
        "--env-file",
        str(run / "env.json"),
        secrets=json.dumps({"TOKEN": secret}).encode(),
    )
    assert secret not in json.dumps(out)
    assert wait_finished(run) == 0
    log = (run / "train.log").read_text()
    # Masked at the source: the instance's own log never holds it (nor S3's copy, nor home's).
    assert f"token={masked} home={home} backend=tensorflow" in log
    assert f"split={masked} done" in log and f"err={masked}" in log and f"setup sees a token {masked}" in log
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_tail_gives_exactly_the_remaining_bytes(agent: Agent, tmp_path: Path) -> None:
    run = tmp_path / "run"
    agent.start(run, r"printf 'one\n'; sleep 0.3; printf 'two\377\n'; sleep 0.3; printf 'three'")
    tail_args = [*agent.argv, "tail", "--run-dir", str(run), "--follow"]
    followers = [
        subprocess.Popen(
            tail_args + ["--offset", str(offset)], cwd=agent.cwd, env=agent.env, stdout=subprocess.PIPE
        )
        for offset in (0, 10)
    ]
    outputs = [f.communicate(timeout=15)[0] for f in followers]
    assert [f.returncode for f in followers] == [0, 0]
    assert (run / "exit_code").exists()  # --follow ended because the run had finished
    log = (run / "train.log").read_bytes()
    assert b"one\ntwo\xff\nthree\n[cloudtrain] run exited with code 0\n" in log
    assert outputs == [log, log[10:]]
    for offset in (0, 5, len(log) - 1, len(log), len(log) + 10):
        proc = agent.run("tail", "--run-dir", str(run), "--offset", str(offset))
        assert proc.returncode == 0 and proc.stdout == log[offset:]


def test_tail_progress_beats_on_stderr_with_the_idle_time_and_progress(agent: Agent, tmp_path: Path) -> None:
    run = tmp_path / "run"
    progress = {"call": "fit", "active": True, "epoch": 2, "epochs": 5, "step": 7, "steps": 10}
    agent.start(run, "printf 'started\\n'; sleep 600")
    (run / "progress.json").write_text(json.dumps(progress))
    old = time.time() - 120  # nothing has changed for two minutes
    for name in ("progress.json", "train.log"):
        os.utime(run / name, (old, old))
    proc = agent.run("tail", "--run-dir", str(run), "--follow", "--progress", "--for", "4.5")
    agent.run("stop", "--run-dir", str(run), "--grace", "1")
    assert proc.returncode == 0 and proc.stdout.startswith(b"[cloudtrain] run: ")
    beats = [json.loads(line) for line in proc.stderr.decode().splitlines()]
    assert len(beats) == 3  # at 0, 2 and 4 s
    assert all(b["progress"] == progress for b in beats)
    assert [round(b["idle_s"] / 10) for b in beats] == [12, 12, 12]  # the files' age, about 120 s
    assert beats[-1]["idle_s"] > beats[0]["idle_s"]
    quiet = agent.run("tail", "--run-dir", str(run), "--for", "1")  # not following: no beats
    assert quiet.stderr == b""


def test_metrics_gives_the_metrics_lines_from_an_offset(agent: Agent, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    proc = agent.run("metrics", "--run-dir", str(run))
    assert proc.returncode == 0 and proc.stdout == b""  # no epoch yet: nothing, no error
    lines = b'{"epoch": 1}\n{"epoch": 2}\n'
    (run / "metrics.jsonl").write_bytes(lines)
    for offset in (0, 13, len(lines), len(lines) + 5):
        proc = agent.run("metrics", "--run-dir", str(run), "--offset", str(offset))
        assert proc.returncode == 0 and proc.stdout == lines[offset:]
    proc = agent.run("metrics", "--run-dir", str(run), "--offset", "-1")
    assert proc.returncode == 2 and proc.stdout == b"" and ">= 0" in json.loads(proc.stderr)["error"]


def test_stop_kills_the_process_group(agent: Agent, tmp_path: Path) -> None:
    run = tmp_path / "run"
    agent.start(run, "sleep 600 & sleep 600; wait")
    wait_for(lambda: read_state(run).get("phase") == "run", what="the run phase")
    pgid = read_state(run)["pgid"]
    wait_for(lambda: len(group_members(pgid)) >= 3, what="sh and both sleeps")
    again = agent.json(
        "start", "--run-dir", str(run), "--workdir", str(tmp_path / "work"), "--run", "true", expect=3
    )
    assert "already" in again["error"]

    out = agent.json("stop", "--run-dir", str(run), "--grace", "3")
    assert out["was_running"] is True and out["stopped"] is True and out["signal"] == "SIGTERM"
    assert out["exit_code"] == 143 and out["pgid"] == pgid
    assert group_members(pgid) == []
    status = agent.json("status", "--run-dir", str(run))
    assert status["phase"] == "done" and status["stopped"] is True and status["exit_code"] == 143
    assert status["signal"] == "SIGTERM" and status["running"] is False
    assert agent.json("stop", "--run-dir", str(run))["was_running"] is False


def test_stop_during_setup_skips_the_run(agent: Agent, tmp_path: Path) -> None:
    run = tmp_path / "run"
    agent.start(run, "echo SHOULD-NOT-RUN", "--setup", "echo preparing; sleep 600")
    wait_for(lambda: "preparing" in (run / "train.log").read_text(), what="setup to begin")
    out = agent.json("stop", "--run-dir", str(run), "--grace", "3")
    assert out["was_running"] is True and out["exit_code"] == 143
    log = (run / "train.log").read_text()
    assert "setup exited with code 143 (SIGTERM)" in log and "SHOULD-NOT-RUN" not in log
    assert read_state(run)["run_exit_code"] is None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def test_status_without_a_run(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = agent.json("status", "--run-dir", str(tmp_path / "empty"))
    assert out["phase"] is None and out["running"] is False and out["exit_code"] is None
    assert out["log_bytes"] == 0 and out["lost"] is False
    assert "does not exist" in agent.json("status", "--run-dir", str(tmp_path / "nope"), expect=3)["error"]


# --- verify ---------------------------------------------------------------------------------------


def fake_python(
    bin_dir: Path, name: str, report: dict[str, Any] | None, stderr: str = "", code: int = 0
) -> str:
    """A script pretending to be the job's Python running the probe; backend from $KERAS_BACKEND."""
    body = f"printf '%s\\n' {shlex.quote(stderr)} >&2\n" if stderr else ""
    if report is not None:
        template = json.dumps(dict(report, backend="@BACKEND@")).replace("@BACKEND@", "'\"$KERAS_BACKEND\"'")
        body += f"echo 'Using some backend.'\necho '{template}'\n"
    write_script(bin_dir / name, f"#!/bin/sh\n{body}exit {code}\n")
    return name


REPORT = {
    "keras_version": "3.5.0",
    "framework": "tensorflow",
    "framework_version": "2.17.0",
    "python": "3.11.7",
}


Prepare = Callable[[str], tuple[Path, dict[str, str]]]


@pytest.fixture
def verify_env(agent: Agent, tmp_path: Path) -> Prepare:
    bin_dir = tmp_path / "bin"
    fake_python(bin_dir, "gpu-python", dict(REPORT, devices=["/physical_device:GPU:0"], gpu=True))
    fake_python(bin_dir, "cpu-python", dict(REPORT, devices=[], gpu=False))
    fake_python(bin_dir, "broken-python", None, "ModuleNotFoundError: No module named 'keras'", 1)

    def prepare(backend: str) -> tuple[Path, dict[str, str]]:
        run = tmp_path / f"run-{backend}"
        agent.backend(backend, tmp_path / "job-home", run, "--gpu", "no")
        return run / "env.json", {"PATH": f"{bin_dir}:{agent.env['PATH']}"}

    return prepare


def test_verify_match(agent: Agent, verify_env: Prepare) -> None:
    env_file, env = verify_env("tensorflow")
    out = agent.json(
        "verify",
        "--backend",
        "tensorflow",
        "--python",
        "gpu-python",
        "--expect-gpu",
        "--env-file",
        str(env_file),
        env=env,
    )
    assert out["ok"] is True and out["backend"] == "tensorflow" and out["gpu"] is True
    assert out["devices"] == ["/physical_device:GPU:0"] and out["keras_version"] == "3.5.0"
    assert out["framework"] == "tensorflow" and out["framework_version"] == "2.17.0"


def test_verify_backend_mismatch(agent: Agent, verify_env: Prepare) -> None:
    env_file, env = verify_env("theano")
    out = agent.json(
        "verify",
        "--backend",
        "tensorflow",
        "--python",
        "gpu-python",
        "--env-file",
        str(env_file),
        env=env,
        expect=3,
    )
    assert "'theano'" in out["error"] and "'tensorflow'" in out["error"] and out["hint"]


def test_verify_expected_gpu_missing(agent: Agent, verify_env: Prepare) -> None:
    env_file, env = verify_env("tensorflow")
    args = ["verify", "--backend", "tensorflow", "--python", "cpu-python", "--env-file", str(env_file)]
    out = agent.json(*args, "--expect-gpu", env=env, expect=3)
    assert "sees no GPU" in out["error"] and "GPU prices for CPU training" in out["error"]
    assert agent.json(*args, env=env)["gpu"] is False  # on CPU, unless a GPU is expected


def test_verify_probe_fails(agent: Agent, verify_env: Prepare) -> None:
    env_file, env = verify_env("tensorflow")
    out = agent.json(
        "verify",
        "--backend",
        "tensorflow",
        "--python",
        "broken-python",
        "--env-file",
        str(env_file),
        env=env,
        expect=3,
    )
    assert "No module named 'keras'" in out["error"]
    out = agent.json("verify", "--backend", "tensorflow", "--python", "no-such-python", env=env, expect=2)
    assert "not found" in out["error"]


@pytest.mark.parametrize(
    ("backend", "framework", "devices"), [("tensorflow", "tensorflow", []), ("theano", "theano", ["cpu"])]
)
def test_verify_runs_the_real_probe(
    agent: Agent, tmp_path: Path, backend: str, framework: str, devices: list[str]
) -> None:
    fakes = fake_modules(tmp_path / "fakes")
    run = tmp_path / "run"
    agent.backend(backend, tmp_path / "job-home", run, "--gpu", "no", "--env", f"PYTHONPATH={fakes}")
    out = agent.json(
        "verify", "--backend", backend, "--python", agent.python, "--env-file", str(run / "env.json")
    )
    assert out["backend"] == backend and out["framework"] == framework and out["devices"] == devices
    assert out["gpu"] is False and out["python"].startswith(f"{sys.version_info[0]}.")
    assert out["keras_version"] == "3.99.0"


def test_verify_reports_tf_keras_for_legacy_keras(agent: Agent, tmp_path: Path) -> None:
    fakes = fake_modules(tmp_path / "fakes")
    run = tmp_path / "run"
    agent.backend(
        "tensorflow", tmp_path / "h", run, "--gpu", "no", "--keras", "2", "--env", f"PYTHONPATH={fakes}"
    )
    args = [
        "verify",
        "--backend",
        "tensorflow",
        "--python",
        agent.python,
        "--env-file",
        str(run / "env.json"),
    ]
    assert agent.json(*args)["tf_keras_version"] == "2.99.0"
    ok = agent.json(*args, "--keras", "2")  # `import keras` is tf_keras: Keras 2, as the job wants
    assert ok["keras_version"] == "2.99.0" and ok["expected_keras"] == 2
    wrong = agent.json(*args, "--keras", "3", expect=3)
    assert "gives Keras 2.99.0, but the job wants Keras 3" in wrong["error"] and wrong["hint"]
    out = agent.json(*args, "--expect-gpu", env={"FAKE_TF_GPU": "1"}, expect=3)  # not passed to the job
    assert "sees no GPU" in out["error"]


# --- poweroff ------------------------------------------------------------------------------------


def test_poweroff_runs_the_hook(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "powered-off"
    hook = write_script(tmp_path / "hook", f'#!/bin/sh\necho "$1|$CLOUDTRAIN_POWEROFF_REASON" > {marker}\n')
    out = agent.json("poweroff", "--reason", "run finished", env={"CLOUDTRAIN_POWEROFF_HOOK": str(hook)})
    assert out["action"] == "hook" and out["exit_code"] == 0
    assert marker.read_text() == "run finished|run finished\n"


def test_poweroff_hook_in_home(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "powered-off"
    write_script(Path(agent.env["HOME"]) / ".cloudtrain" / "poweroff", f"#!/bin/sh\ntouch {marker}\n")
    assert agent.json("poweroff")["action"] == "hook"
    assert marker.exists()


def test_poweroff_failures(agent: Agent, tmp_path: Path) -> None:
    failing = write_script(tmp_path / "failing-hook", "#!/bin/sh\necho no such instance; exit 4\n")
    out = agent.json("poweroff", env={"CLOUDTRAIN_POWEROFF_HOOK": str(failing)}, expect=3)
    assert "exited with 4" in out["error"] and "no such instance" in out["error"]
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    out = agent.json("poweroff", env={"CLOUDTRAIN_POWEROFF_HOOK": str(tmp_path / "not-executable")}, expect=3)
    assert "not an executable" in out["error"]


def test_poweroff_refuses_under_testing_without_a_hook(agent: Agent, tmp_path: Path) -> None:
    # Belt and braces: were the guard broken, these fakes would run, not the real thing.
    bin_dir, called = tmp_path / "bin", tmp_path / "called"
    for name in ("shutdown", "sudo", "poweroff"):
        write_script(bin_dir / name, f"#!/bin/sh\necho {name} >> {called}\n")
    out = agent.json("poweroff", "--reason", "test", env={"PATH": f"{bin_dir}:{agent.env['PATH']}"}, expect=3)
    assert "refusing" in out["error"] and "CLOUDTRAIN_POWEROFF_HOOK" in out["hint"]
    assert not called.exists()


# --- usage, packaging ---------------------------------------------------------------------------


def test_usage_errors_are_json_with_status_2(agent: Agent, tmp_path: Path) -> None:
    assert "invalid choice" in agent.json("no-such-command", expect=2)["error"]
    assert agent.json("backend", "--backend", "jax", "--home", "h", "--run-dir", "r", expect=2)["hint"]
    assert "required" in agent.json("start", "--run-dir", str(tmp_path), expect=2)["error"]
    (tmp_path / "work").mkdir()
    base = ["start", "--run-dir", str(tmp_path / "run"), "--run", "true"]
    out = agent.json(*base, "--workdir", str(tmp_path / "work"), stdin=b"not json", expect=2)
    assert "not valid JSON" in out["error"] and "not json" not in out["error"]
    assert agent.json(*base, "--workdir", str(tmp_path / "nope"), expect=2)["error"].startswith("workdir")
    proc = agent.run("tail", "--run-dir", str(tmp_path / "nope"))
    assert proc.returncode == 3 and proc.stdout == b"" and "no run log" in json.loads(proc.stderr)["error"]


# S3 transfers may use the image's boto3 (DESIGN.md); imported lazily there, nowhere else.
# The checkpoint hook touches numpy only inside `fit`; the run's sitecustomize imports
# checkpoint.py under the name it is copied to (_cloudtrain_checkpoint).
IMAGE_PACKAGES = {
    "fetch_s3.py": {"boto3", "botocore"},
    "s3_checkpoint.py": {"botocore"},  # lazily, like fetch_s3.py
    "keras2shim.py": {"tf_keras"},
    "checkpoint.py": {"numpy"},
    "runsite.py": {"_cloudtrain_checkpoint"},
}


def test_agent_imports_only_the_standard_library_and_itself() -> None:
    files = sorted(AGENT_SRC.glob("*.py"))
    assert {p.name for p in files} >= AGENT_MODULES, AGENT_SRC  # the agent is where we look
    for path in files:
        allowed = IMAGE_PACKAGES.get(path.name, set())
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} needs a docstring saying its job"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in allowed or top == "__future__", (
                    f"{path.name} imports {name}"
                )


def agent_import_graph() -> dict[str, set[str]]:
    """Each agent module -> the agent modules it imports, at module level or in a function."""
    graph: dict[str, set[str]] = {}
    for path in sorted(AGENT_SRC.glob("*.py")):
        found = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
    return graph


def test_the_agent_has_no_import_cycle() -> None:
    graph = agent_import_graph()
    assert {"cli", "fetch_s3", "s3_checkpoint", "supervisor"} <= graph.keys() and graph["cli"], graph
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"an import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_agent_compiles_on_python37(tmp_path: Path) -> None:
    python37 = needs.python37()
    files = sorted(str(p) for p in AGENT_SRC.glob("*.py"))
    assert {Path(f).name for f in files} >= AGENT_MODULES, AGENT_SRC  # the agent is where we look
    code = (
        "import py_compile, sys\n"
        "for i, f in enumerate(sys.argv[2:]):\n"
        "    py_compile.compile(f, cfile='%s/%d.pyc' % (sys.argv[1], i), doraise=True)\n"
    )
    proc = subprocess.run([python37, "-c", code, str(tmp_path), *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for f in files:  # and the controller's Python, for good measure
        py_compile.compile(f, cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_verify_names_a_backend_that_does_not_import(agent: Agent, tmp_path: Path) -> None:
    fakes = fake_modules(tmp_path / "fakes")
    shutil.rmtree(fakes / "theano")  # keras says theano; there is no theano
    run = tmp_path / "run"
    agent.backend("theano", tmp_path / "h", run, "--gpu", "no", "--env", f"PYTHONPATH={fakes}")
    args = ["verify", "--python", agent.python, "--env-file", str(run / "env.json")]
    out = agent.json(*args, "--backend", "theano", expect=3)
    assert "Keras uses the theano backend, but theano does not import" in out["error"]
    assert "No module named 'theano'" in out["error"]
    out = agent.json(*args, "--backend", "tensorflow", expect=3)  # a mismatch is named as such
    assert "Keras uses the 'theano' backend, but the job wants 'tensorflow'" in out["error"]
