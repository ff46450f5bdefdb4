"""Bringing an instance up, shared by `run` and `image build`: the instance's layout, the
agent's command line and reports, the host key fingerprints from the console, the image
recipe, and the backend's configuration and check."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from importlib.resources import files
from pathlib import Path
from typing import Any

from cloudtrain.cloud.aws import AwsCloud
from cloudtrain.errors import RemoteError
from cloudtrain.progress import Reporter
from cloudtrain.remote.session import Session, parse_console_fingerprints

REMOTE_USER = "ubuntu"
REMOTE_AGENT = ".cloudtrain/agent"  # relative to the remote HOME: the agent package's parent
REMOTE_RUN_DIR = ".cloudtrain/run"  # env.json, train.log, state.json, exit_code
REMOTE_WORKDIR = "work"  # the synced workdir
REMOTE_RECIPE = ".cloudtrain/ami"  # ami/, for provision.sh (image build; resources.image: base)
FINGERPRINT_TIMEOUT_S = 600.0


def remote_python(backend: str) -> str:
    """The job environment's interpreter on the instance (the image's layout)."""
    return f'"${{CLOUDTRAIN_ROOT:-/opt/cloudtrain}}/envs/{backend}/bin/python"'


def agent_command(backend: str, args: str) -> str:
    """The shell command that runs the uploaded agent with ``args`` in the job environment."""
    return f"PYTHONPATH=$HOME/{REMOTE_AGENT} {remote_python(backend)} -m cloudtrain_agent {args}"


def agent_source() -> Path:
    """The agent package's folder here, as uploaded to the instance."""
    return Path(str(files("cloudtrain.agent")))


def provision_command(envs: Sequence[str]) -> str:
    """The recipe on the builder: into /opt/cloudtrain (made with sudo, owned by the login user)
    with the GPU flavor; a simulated builder names its image prefix and is CPU-only."""
    prefix = '"${CLOUDTRAIN_IMAGE_PREFIX:-/opt/cloudtrain}"'
    flavor = '$([ -n "$CLOUDTRAIN_SIMULATED" ] && echo cpu || echo gpu)'
    return (
        f"prefix={prefix} && "
        '{ [ -w "$prefix" ] || mkdir -p "$prefix" 2>/dev/null || '
        '{ sudo mkdir -p "$prefix" && sudo chown "$(id -u):$(id -g)" "$prefix"; }; } && '
        f'bash {REMOTE_RECIPE}/provision.sh --prefix "$prefix" --flavor "{flavor}" '
        f"--envs {shlex.quote(','.join(envs))} 2>&1"
    )


class RecipeOutput:
    """Turns the recipe's streamed output into lines: ``[provision]`` steps become progress,
    the rest is shown as it comes (and the last lines kept for an error message)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.buffer = b""
        self.tail: list[str] = []

    def __call__(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail = (self.tail + [line])[-30:]
            if line.startswith("[provision] "):
                self.reporter.info(f"recipe: {line.removeprefix('[provision] ')}")
            else:
                self.reporter.log(raw + b"\n")


def run_recipe(session: Session, envs: Sequence[str], reporter: Reporter, instance_id: str) -> None:
    """Upload ami/ and run its provision.sh for ``envs`` on the instance, output streamed
    (``image build``; a run on ``resources.image: base``). A failure raises RemoteError."""
    from cloudtrain.cloud.simimage import recipe_dir
    from cloudtrain.remote.sync import upload_tree

    upload_tree(session, recipe_dir(), REMOTE_RECIPE)
    lines = RecipeOutput(reporter)
    code = session.stream(provision_command(envs), lines)
    if lines.buffer:
        lines(b"\n")
    if code != 0:
        raise RemoteError(
            f"the image recipe failed on {instance_id} (exit code {code}):\n" + "\n".join(lines.tail[-15:]),
            hint="See the recipe's output above.",
        )


def verify_backend(
    session: Session, backend: str, run_dir: str, backend_args: str = "", keras: str = ""
) -> dict[str, Any]:
    """Configure ``backend`` on the instance (the agent's ``backend``: keras.json, .theanorc,
    ``run_dir``/env.json), then verify it (``verify``: import Keras in the job environment;
    on a GPU instance, each backend must see the GPU). Returns the agent's report; a backend
    that does not work raises RemoteError. The agent must be uploaded already.

    ``run`` passes the job's options in ``backend_args`` (seed, keras, checkpoints, env);
    ``image build`` verifies each environment of the image it builds with none."""
    path = f"PATH=${{CLOUDTRAIN_ROOT:-/opt/cloudtrain}}/envs/{backend}/bin:$PATH"
    gpu = '$([ -n "$CLOUDTRAIN_SIMULATED" ] && echo no || echo auto)'
    session.run(
        f"mkdir -p {run_dir} && "
        + agent_command(
            backend,
            f"backend --backend {backend} --home $HOME --run-dir {run_dir} "
            f'--gpu {gpu} --env "{path}"{backend_args.rstrip()}',
        )
    )
    expect_gpu = '$([ -z "$CLOUDTRAIN_SIMULATED" ] && echo --expect-gpu)'
    report = agent_report(
        session,
        backend,
        f"verify --backend {backend} --python {remote_python(backend)} "
        f"--env-file {run_dir}/env.json{keras} {expect_gpu}",
    )
    if "error" in report:
        raise RemoteError(
            f"the {backend} backend does not work on the instance: {report['error']}",
            hint=str(report.get("hint") or "See the image's job environment."),
        )
    return report


def wait_for_fingerprints(
    cloud: AwsCloud, instance_id: str, timeout: float = FINGERPRINT_TIMEOUT_S, poll: float = 5.0
) -> frozenset[str]:
    """The host key fingerprints cloud-init prints on the console (it can take minutes)."""
    end = time.monotonic() + timeout
    delay = 0.2
    while True:
        found = parse_console_fingerprints(cloud.console_output(instance_id))
        if found:
            return found
        if time.monotonic() > end:
            raise RemoteError(
                f"{instance_id} printed no SSH host key fingerprints on its console in {timeout:.0f} s",
                hint="The image must run cloud-init: without pinned fingerprints there is no connection.",
            )
        time.sleep(delay)
        delay = min(delay * 2, poll)


def agent_report(session: Session, backend: str, args: str) -> dict[str, Any]:
    """Run an agent command that prints one JSON object; its report, with ``error`` set
    when the command failed (the agent's own message, else its output)."""
    result = session.run(agent_command(backend, args), check=False)
    report = json_report(result.text)
    if result.exit_code != 0 and "error" not in report:
        report["error"] = result.text.strip()[-500:] or f"exit code {result.exit_code}"
    return report


def json_report(text: str) -> dict[str, Any]:
    """The last JSON object the agent printed, else ``{"error": <the output's tail>}``."""
    for line in reversed(text.strip().splitlines()):
        with suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return {"error": text.strip()[-500:] or "no output"}


def describe_backend(report: Mapping[str, Any]) -> str:
    devices = report.get("devices") or []
    where = ", ".join(map(str, devices)) if devices else "CPU"
    return (
        f"backend verified: Keras {report.get('keras_version')} on {report.get('framework')} "
        f"{report.get('framework_version')} ({report.get('backend')}), device: {where}"
    )
