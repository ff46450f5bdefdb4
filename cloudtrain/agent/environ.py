"""The environment a job's commands get: a minimal base, then env.json, then secrets.

The agent's own environment (an SSH session's) is not passed on wholesale: only the
few variables a shell and a GPU stack need. env.json (written by `backend`) adds the
backend's variables; secrets, read from stdin by `start`, are added last and live
only in memory and in the job processes' environments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from .errors import USAGE, AgentError
from .runfiles import read_json

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Passed through from the agent's environment when set there.
PASSED_THROUGH = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
)


def base_env(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The minimal environment taken from `source` (default: the agent's own)."""
    src = os.environ if source is None else source
    env = {name: src[name] for name in PASSED_THROUGH if name in src}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def load_env_file(path: str) -> dict[str, str]:
    """The variables of an env.json file: a JSON object of strings."""
    obj = read_json(path)
    if obj is None:
        raise AgentError(
            f"env file {path} does not exist", "Run `backend` first, or pass the right --env-file.", USAGE
        )
    bad = [key for key, value in obj.items() if not isinstance(value, str)]
    if bad:
        raise AgentError(
            "env file {}: values must be strings: {}".format(path, ", ".join(sorted(bad))), "", USAGE
        )
    return {str(key): str(value) for key, value in obj.items()}


def parse_secrets(text: str) -> dict[str, str]:
    """Secrets from stdin: a JSON object of string values; empty input means none.

    Error messages name the keys, never the values.
    """
    if not text.strip():
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        raise AgentError(
            "the secrets on stdin are not valid JSON", 'Send a JSON object such as {"NAME": "value"}.', USAGE
        ) from None
    if not isinstance(obj, dict):
        raise AgentError("the secrets on stdin must be a JSON object", 'Send {"NAME": "value"}.', USAGE)
    bad = sorted(str(key) for key, value in obj.items() if not isinstance(value, str) or not key)
    if bad:
        raise AgentError(
            "secrets must be non-empty names with string values: {}".format(", ".join(bad)), "", USAGE
        )
    return {str(key): str(value) for key, value in obj.items()}


def job_env(env_file: str | None, secrets: Mapping[str, str] | None = None) -> dict[str, str]:
    """Base environment, then the env file's variables, then the secrets."""
    env = base_env()
    if env_file:
        env.update(load_env_file(env_file))
    if secrets:
        env.update(secrets)
    return env
