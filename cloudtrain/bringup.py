"""Bringing an instance up, shared by `run` and `image build`: its SSH endpoint (the host
key fingerprints from the console, its address), the image recipe, and the backend's
configuration and check (through the agent, remote/agent.py)."""

from __future__ import annotations

import ipaddress
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cloudtrain.cloud.aws import AwsCloud, LaunchedInstance
from cloudtrain.errors import RemoteError
from cloudtrain.progress import Reporter
from cloudtrain.remote.agent import AgentConfig, RemoteAgent
from cloudtrain.remote.session import Endpoint, Session, parse_console_fingerprints

REMOTE_USER = "ubuntu"
REMOTE_RECIPE = ".cloudtrain/ami"  # ami/, for provision.sh (image build; resources.image: base)
FINGERPRINT_TIMEOUT_S = 600.0


def provision_command(envs: Sequence[str], *, gpu: bool = True) -> str:
    """The recipe on the builder: into /opt/cloudtrain (made with sudo, owned by the login user)
    with the GPU flavor, or the CPU one without ``gpu``; a simulated builder names its image
    prefix."""
    prefix = '"${CLOUDTRAIN_IMAGE_PREFIX:-/opt/cloudtrain}"'
    flavor = "gpu" if gpu else "cpu"
    return (
        f"prefix={prefix} && "
        '{ [ -w "$prefix" ] || mkdir -p "$prefix" 2>/dev/null || '
        '{ sudo mkdir -p "$prefix" && sudo chown "$(id -u):$(id -g)" "$prefix"; }; } && '
        f'bash {REMOTE_RECIPE}/provision.sh --prefix "$prefix" --flavor "{flavor}" '
        f"--envs {shlex.quote(','.join(envs))} 2>&1"
    )


class RecipeOutput:
    """Turns the recipe's streamed output into lines: ``[provision]`` steps become progress
    (simimage.RecipeSteps), the rest is shown as it comes (and the last lines kept for an
    error message)."""

    def __init__(self, reporter: Reporter) -> None:
        from cloudtrain.cloud.simimage import RecipeSteps

        self.reporter = reporter
        self.steps = RecipeSteps(reporter, "image recipe", "recipe")
        self.buffer = b""
        self.tail: list[str] = []

    def __call__(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail = (self.tail + [line])[-30:]
            if not self.steps.line(line):
                self.reporter.log(raw + b"\n")


def run_recipe(
    session: Session, envs: Sequence[str], reporter: Reporter, instance_id: str, *, gpu: bool = True
) -> None:
    """Upload ami/ and run its provision.sh for ``envs`` on the instance, output streamed
    (``image build``; a run on ``resources.image: base``). A failure raises RemoteError."""
    from cloudtrain.cloud.simimage import recipe_dir
    from cloudtrain.remote.sync import upload_tree

    upload_tree(
        session,
        recipe_dir(),
        REMOTE_RECIPE,
        progress=lambda done, total: reporter.transfer("uploading the recipe", done, total),
    )
    lines = RecipeOutput(reporter)
    code = session.stream(provision_command(envs, gpu=gpu), lines)
    if lines.buffer:
        lines(b"\n")
    if code != 0:
        raise RemoteError(
            f"the image recipe failed on {instance_id} (exit code {code}):\n" + "\n".join(lines.tail[-15:]),
            hint="See the recipe's output above.",
        )
    lines.steps.finished()


def verify_backend(
    agent: RemoteAgent, config: AgentConfig | None = None, *, gpu: bool = True
) -> dict[str, Any]:
    """Configure the agent's backend on the instance (keras.json, .theanorc, the run folder's
    env.json), then verify it (import Keras in the job environment; on a GPU instance, each
    backend must see the GPU). Returns the agent's report; a backend that does not work
    raises RemoteError. The agent must be installed already.

    ``run`` passes the job's options in ``config``; ``image build`` verifies each
    environment of the image it builds with none. ``gpu``: whether the instance has one
    (``Settings.instance_gpus``)."""
    agent.configure(config, gpu="auto" if gpu else "no")
    report = agent.verify(config.keras if config else None, expect_gpu=gpu)
    if "error" in report:
        raise RemoteError(
            f"the {agent.backend} backend does not work on the instance: {report['error']}",
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


def ssh_endpoint(
    cloud: AwsCloud, instance_id: str, key_path: Path, *, loopback_only: bool
) -> tuple[LaunchedInstance, Endpoint]:
    """The booted instance, and where to reach it: its public address and its host keys as its
    console printed them (pinned). ``loopback_only`` (a dry-run's simulated hosts): any other
    address is refused, so a dry-run never dials out."""
    fingerprints = wait_for_fingerprints(cloud, instance_id)
    launched = cloud.describe(instance_id)  # the address, now that it has booted
    if not launched.ssh_host:
        raise RemoteError(
            f"{instance_id} has no public IP address",
            hint="Launch into a subnet that assigns public IPs (the default VPC does).",
        )
    if loopback_only and not ipaddress.ip_address(launched.ssh_host).is_loopback:
        raise RemoteError(f"refusing to dial {launched.ssh_host} in a dry-run: simulated hosts are loopback")
    return launched, Endpoint(launched.ssh_host, launched.ssh_port, REMOTE_USER, key_path, fingerprints)


def describe_backend(report: Mapping[str, Any]) -> str:
    devices = report.get("devices") or []
    where = ", ".join(map(str, devices)) if devices else "CPU"
    return (
        f"backend verified: Keras {report.get('keras_version')} on {report.get('framework')} "
        f"{report.get('framework_version')} ({report.get('backend')}), device: {where}"
    )
