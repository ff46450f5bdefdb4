"""Verify the backend: import Keras in the job's environment and check what it reports.

`PY -c PROBE` runs with the run's environment; the probe prints one JSON line
(`backend`, `keras_version`, `framework`, `framework_version`, `devices`, `gpu`,
`python`). The agent compares it with the wanted backend, and with `--expect-gpu`
refuses a backend that sees no GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from .environ import job_env
from .errors import USAGE, AgentError

MARKER = "CLOUDTRAIN_PROBE "

PROBE = r"""
import json, os, sys
report = {"python": sys.version.split()[0], "executable": sys.executable}
import keras
report["keras_version"] = getattr(keras, "__version__", None)
try:
    backend = keras.backend.backend()
except Exception:
    backend = os.environ.get("KERAS_BACKEND")
report["backend"] = backend
report["framework"] = None
report["framework_version"] = None
devices = []
gpu = False
def framework(name):
    try:
        return __import__(name)
    except ImportError as e:
        report["framework_error"] = "%s: %s" % (type(e).__name__, e)
        return None
if backend == "tensorflow" and framework("tensorflow") is not None:
    import tensorflow as tf
    report["framework"] = "tensorflow"
    report["framework_version"] = getattr(tf, "__version__", None)
    try:
        found = tf.config.list_physical_devices("GPU")
    except AttributeError:
        found = tf.config.experimental.list_physical_devices("GPU")
    devices = [d.name for d in found]
    gpu = bool(devices)
    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        try:
            import tf_keras
            report["tf_keras_version"] = getattr(tf_keras, "__version__", None)
        except ImportError:
            report["tf_keras_version"] = None
elif backend == "theano" and framework("theano") is not None:
    import theano
    report["framework"] = "theano"
    report["framework_version"] = getattr(theano, "__version__", None)
    device = str(theano.config.device)
    devices = [device]
    if device.startswith("cuda") or device.startswith("gpu"):
        try:
            import theano.gpuarray
            gpu = bool(getattr(theano.gpuarray, "pygpu_activated", False))
        except Exception:
            gpu = False
report["devices"] = devices
report["gpu"] = gpu
sys.stdout.write("\n" + "CLOUDTRAIN_PROBE " + json.dumps(report) + "\n")
sys.stdout.flush()
"""

NO_GPU = "the backend sees no GPU: broken driver/CUDA; you'd pay GPU prices for CPU training"


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def parse_report(stdout: str) -> dict[str, Any] | None:
    """The probe's JSON report: the last line (marked or not) holding a JSON object."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith(MARKER):
            line = line[len(MARKER) :]
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def run_probe(python: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    exe = python if os.sep in python else shutil.which(python, path=env.get("PATH"))
    if exe is None or not os.access(exe, os.X_OK):
        raise AgentError(
            f"python {python!r} not found or not executable",
            "Pass the job environment's interpreter, e.g. --python /opt/envs/theano/bin/python.",
            USAGE,
        )
    try:
        proc = subprocess.run(
            [exe, "-c", PROBE],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=env.get("HOME") if os.path.isdir(env.get("HOME", "")) else None,
        )
    except subprocess.TimeoutExpired:
        raise AgentError(
            f"the backend probe did not finish in {timeout:g} s",
            "Importing Keras hangs: check the GPU driver (nvidia-smi) or raise --timeout.",
        ) from None
    except OSError as e:
        raise AgentError(f"could not run {exe}: {e}", "Check --python.") from None
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace")
    report = parse_report(stdout) if proc.returncode == 0 else None
    if report is None:
        raise AgentError(
            f"the backend probe failed ({exe} exited with {proc.returncode}): "
            + (_tail(stderr) or _tail(stdout) or "no output"),
            "Keras or its backend does not import in the job's environment: check the image and setup.",
        )
    return report


def verify(
    backend: str,
    python: str,
    expect_gpu: bool = False,
    env_file: str | None = None,
    timeout: float = 600.0,
    keras: int | None = None,
) -> dict[str, Any]:
    """Run the probe and check it; return its report with `ok: true`."""
    env = job_env(env_file)
    report = run_probe(python, env, timeout)
    seen = report.get("backend")
    if seen != backend:
        raise AgentError(
            f"Keras uses the {seen!r} backend, but the job wants {backend!r}",
            "Check KERAS_BACKEND and keras.json in the job's environment (run `backend` again).",
        )
    if report.get("framework_error"):
        raise AgentError(
            f"Keras uses the {backend} backend, but {backend} does not import: {report['framework_error']}",
            "The image's job environment is broken; check it (and the job's PYTHONPATH).",
        )
    version = str(report.get("keras_version") or "")
    if keras is not None and version.split(".")[0] != str(keras):
        raise AgentError(
            f"`import keras` gives Keras {version or 'of no version'}, but the job wants Keras {keras}",
            "keras: 2 on tensorflow needs tf-keras in the image (and `backend --keras 2`); "
            "theano is Keras 2 only.",
        )
    if expect_gpu and not report.get("gpu"):
        raise AgentError(
            f"{NO_GPU} (devices: {report.get('devices') or 'none'})",
            "Check `nvidia-smi` and the CUDA libraries on the image; stop the instance rather than train.",
        )
    report["ok"] = True
    report["expected_backend"] = backend
    report["expected_keras"] = keras
    return report
