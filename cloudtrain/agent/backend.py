"""Backend configuration: keras.json, .theanorc and the run's env.json (plus seeding, checkpoints).

`configure()` writes HOME/.keras/keras.json, for Theano HOME/.theanorc (and
HOME/.theano, the run's compile folder, seeded from the image's warmed cache), and
RUN_DIR/env.json: the variables every command of the run gets (KERAS_BACKEND,
KERAS_HOME, HOME, THEANO_FLAGS, seed and checkpoint variables ...). With a seed or a
checkpoint folder it also writes RUN_DIR/site/ (the run's sitecustomize.py, first on
PYTHONPATH; see runsite.py and checkpoint.py). GPU "auto" means: `nvidia-smi -L`
exists and lists a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from . import s3_checkpoint, sitedir
from .errors import USAGE, AgentError
from .runfiles import RunPaths, write_atomic, write_json

BACKENDS = ("tensorflow", "theano")


def detect_gpus(timeout: float = 20.0) -> list[str]:
    """GPU lines of `nvidia-smi -L` ("GPU 0: Tesla T4 (UUID: ...)"); [] without a working one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = subprocess.run(
            [exe, "-L"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    lines = proc.stdout.decode("utf-8", "replace").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("GPU ")]


def keras_json(backend: str) -> dict[str, object]:
    return {
        "backend": backend,
        "floatx": "float32",
        "epsilon": 1e-07,
        "image_data_format": "channels_last",
    }


def theanorc(device: str) -> str:
    return f"[global]\ndevice = {device}\nfloatX = float32\n"


KERAS2_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras2shim.py")


def _write_keras2_shim(run_dir: str) -> str:
    """RUN_DIR/keras2/keras/__init__.py: `import keras` is tf_keras (see keras2shim.py)."""
    folder = os.path.join(run_dir, "keras2")
    package = os.path.join(folder, "keras")
    os.makedirs(package, exist_ok=True)
    with open(KERAS2_SHIM, "rb") as source:
        write_atomic(os.path.join(package, "__init__.py"), source.read())
    return folder


def _seed_compiledir(cache: str | None, compiledir: str) -> str | None:
    """Start this run's own Theano compile folder as a copy of the image's warmed cache
    (the image stays read-only); an existing folder is kept. Returns the cache used."""
    if not cache or not os.path.isdir(cache) or os.path.exists(compiledir):
        return None
    tmp = compiledir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cache, tmp, symlinks=True)
    os.rename(tmp, compiledir)
    return cache


def configure(
    backend: str,
    home: str,
    run_dir: str,
    gpu: str = "auto",
    seed: int | None = None,
    keras: int | None = None,
    extra_env: dict[str, str] | None = None,
    compile_cache: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    notice_file: str | None = None,
    checkpoint_s3: str | None = None,
    region: str | None = None,
) -> dict[str, object]:
    """Write the configuration files; return what was written, for the controller."""
    if backend not in BACKENDS:
        raise AgentError(f"unknown backend {backend!r}", "Use one of: " + ", ".join(BACKENDS) + ".", USAGE)
    if backend == "theano" and keras == 3:
        raise AgentError("Keras 3 has no Theano backend", "Use --keras 2 (keras 2.3.1) with theano.", USAGE)
    if seed is not None and not 0 <= seed <= 2**32 - 1:
        raise AgentError(f"seed {seed} is out of range", "Use a seed from 0 to 4294967295.", USAGE)
    if checkpoint_every < 1:
        raise AgentError(f"--checkpoint-every must be 1 or more, not {checkpoint_every}", "", USAGE)
    if gpu not in ("auto", "yes", "no"):
        raise AgentError(f"--gpu must be auto, yes or no, not {gpu!r}", "", USAGE)

    gpus = detect_gpus() if gpu == "auto" else []
    use_gpu = gpu == "yes" or (gpu == "auto" and bool(gpus))

    home = os.path.abspath(home)
    paths = RunPaths(run_dir)
    keras_home = os.path.join(home, ".keras")
    os.makedirs(keras_home, exist_ok=True)
    os.makedirs(paths.run_dir, exist_ok=True)

    keras_json_path = os.path.join(keras_home, "keras.json")
    write_json(keras_json_path, keras_json(backend))

    # The job's own variables first: the backend's variables win over them.
    env = dict(extra_env or {})
    env.update(
        {
            "HOME": home,
            "KERAS_HOME": keras_home,
            "KERAS_BACKEND": backend,
            "PYTHONUNBUFFERED": "1",
        }
    )
    theanorc_path = None
    seeded_from = None
    if backend == "theano":
        device = "cuda" if use_gpu else "cpu"
        theanorc_path = os.path.join(home, ".theanorc")
        write_atomic(theanorc_path, theanorc(device).encode("ascii"))
        compiledir = os.path.join(home, ".theano")
        seeded_from = _seed_compiledir(compile_cache, compiledir)
        flags = f"device={device},floatX=float32,base_compiledir={compiledir}"
        job_flags = (extra_env or {}).get("THEANO_FLAGS")  # the job's own come last: they win
        env["THEANO_FLAGS"] = f"{flags},{job_flags}" if job_flags else flags
    keras2_dir = None
    if backend == "tensorflow" and keras == 2:
        env["TF_USE_LEGACY_KERAS"] = "1"
        keras2_dir = _write_keras2_shim(paths.run_dir)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (keras2_dir, env.get("PYTHONPATH", "")) if p)

    site_dir = None
    checkpoint = None
    if seed is not None or checkpoint_dir:
        site_dir = sitedir.write_site(paths)
        env["PYTHONPATH"] = sitedir.prepend_path(site_dir, env.get("PYTHONPATH", ""))
    if seed is not None:
        env.update(sitedir.seed_env(seed))
    if checkpoint_dir:
        folder = os.path.abspath(checkpoint_dir)
        notice = os.path.abspath(notice_file or paths.notice)
        os.makedirs(folder, exist_ok=True)
        env.update(sitedir.checkpoint_env(folder, checkpoint_every, notice, paths.metrics, paths.progress))
        checkpoint = {"dir": folder, "every": checkpoint_every, "notice_file": notice, "s3": checkpoint_s3}
        if checkpoint_s3:  # the supervisor's uploader reads these (s3_checkpoint.py)
            env[s3_checkpoint.URL_ENV] = checkpoint_s3
            if region:
                env[s3_checkpoint.REGION_ENV] = region
    elif checkpoint_s3:
        raise AgentError("--checkpoint-s3 needs --checkpoint-dir", "", USAGE)

    write_json(paths.env, env)
    return {
        "backend": backend,
        "gpu": use_gpu,
        "gpu_mode": gpu,
        "gpus": gpus,
        "keras": keras,
        "seed": seed,
        "keras_json": keras_json_path,
        "theanorc": theanorc_path,
        "env_file": paths.env,
        "site_dir": site_dir,
        "checkpoint": checkpoint,
        "keras2_shim": keras2_dir,
        "compile_cache": seeded_from,
        "env": env,
    }
