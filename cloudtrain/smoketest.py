"""``cloudtrain doctor --launch``: the real control path of a run on a small spot instance,
for cents, with no training: what a first real day should try before a GPU run.

Phases, each timed: Canonical's Ubuntu 22.04 image found by name and owner; the run's key
pair and /32 security group; a spot launch of the catalog's small x86_64 type
(``cpu_instance_types``, ``t3.micro``) with IMDSv2 required; its host key pinned from
the console output; SSH; the agent installed and run on the image's own ``python3``
(backend configuration, the watchdog, a command started, followed to its end, its log
read; the agent's IMDSv2 spot-notice watcher must have started); teardown confirmed;
nothing of the run left (instances, volumes, group, key pair, spot requests).

The smoke test is a run named ``doctor-launch`` in the ledger, with its instance, so
``cost-report`` shows what it cost. The same code runs for ``--dry-run`` against the
simulator, whose Ubuntu image is a stand-in (``sim_amis.json``) and whose host is local.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from cloudtrain.bringup import ssh_endpoint
from cloudtrain.catalog import load_catalog
from cloudtrain.cloud.aws import AwsCloud, LaunchRequest, caller_cidr, run_tags
from cloudtrain.errors import CloudError, CloudtrainError, ExitCode, InputError, RemoteError
from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.planner import catalog_label
from cloudtrain.prices import ESTIMATE_LABEL, catalog_spot, estimated_spot, price_problem
from cloudtrain.progress import Reporter
from cloudtrain.records import Lifecycle, RunHandle, RunState, iso, new_run_id, utcnow
from cloudtrain.remote.agent import REMOTE_WORKDIR, AgentCli, RemoteAgent
from cloudtrain.remote.session import Session
from cloudtrain.settings import Settings
from cloudtrain.teardown import shielded_from_signals, teardown

SMOKE_NAME = "doctor-launch"  # its run name: a line of its own in cost-report
SMOKE_TYPE = "t3.micro"
SMOKE_DISK_GB = 8  # the Ubuntu image's root volume
SMOKE_HOURS = 1.0  # the expiry tag (gc) and the watchdog's deadline: it takes minutes
SMOKE_RUN_DIR = ".cloudtrain/doctor-launch"
# a few seconds: the agent's spot-notice watcher polls IMDS once at least meanwhile
COMMAND = 'echo "cloudtrain smoke test on $(uname -m) with $(python3 --version)"; sleep 3'
VOLUME_GONE_S = 90.0  # a terminated instance's root volume may be listed a while yet
COMMAND_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.name, "seconds": round(self.seconds, 2), "detail": self.detail}


@dataclass
class SmokeResult:
    run_id: str
    region: str
    instance_type: str
    simulated: bool
    phases: list[Phase] = field(default_factory=list)
    instance_id: str | None = None
    zone: str | None = None
    price_per_hour: float | None = None
    price_source: str | None = None
    python: str | None = None
    output: str = ""
    left: list[str] = field(default_factory=list)  # what teardown could not remove

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "run_id": self.run_id,
            "region": self.region,
            "instance_type": self.instance_type,
            "instance": self.instance_id,
            "zone": self.zone,
            "price_per_hour": self.price_per_hour,
            "price_source": self.price_source,
            "python": self.python,
            "output": self.output,
            "phases": [p.to_json() for p in self.phases],
            "left": self.left,
            "simulated": self.simulated,
        }


def smoke_price(instance_type: str, region: str) -> float:
    """The small type's on-demand USD/h from the catalog; an InputError for one it lacks."""
    itype = load_catalog().cpu_type(instance_type)
    price = itype.on_demand_price(region) if itype else None
    if price is None:
        types = ", ".join(t.name for t in load_catalog().cpu_instance_types)
        raise InputError(
            f"no small instance type {instance_type} priced in {region} in the catalog",
            hint=f"Use one of its cpu_instance_types ({types}) and a region it prices.",
        )
    return price


def smoke_test(
    settings: Settings,
    ledger: Ledger,
    *,
    region: str,
    instance_type: str = SMOKE_TYPE,
    reporter: Reporter | None = None,
) -> SmokeResult:
    """Launch, reach, drive and remove one small spot instance; raise on the first failure
    (after teardown). The instance is terminated whatever happens."""
    reporter = reporter or Reporter()
    on_demand = smoke_price(instance_type, region)
    cloud = AwsCloud(settings, region)  # before the run is recorded: nothing to end if this fails
    now = utcnow()
    run_id = new_run_id(SMOKE_NAME, now)
    ledger.create_run(
        RunRow(
            id=run_id,
            name=SMOKE_NAME,
            state=RunState.PLANNED,
            created_at=now,
            backend="none",
            simulated=settings.simulated,
            region=region,
            handle=RunHandle(instance_type=instance_type),
        )
    )
    result = SmokeResult(run_id, region, instance_type, settings.simulated)
    held = RunHandle()
    outcome, exit_code = RunState.FAILED, None

    @contextmanager
    def phase(name: str) -> Iterator[list[str]]:
        detail: list[str] = []
        started = time.monotonic()
        yield detail
        result.phases.append(Phase(name, time.monotonic() - started, "; ".join(detail)))

    def state(new: RunState, message: str) -> None:
        ledger.update_run(run_id, state=new)
        ledger.add_event(run_id, new.value, message)
        reporter.stage(new, message)

    try:
        tags = run_tags(run_id, settings.owner, now + timedelta(hours=SMOKE_HOURS))
        state(RunState.LAUNCHING, f"launching {instance_type} (spot) in {region}, no training")
        with phase("image") as detail:
            image = cloud.ubuntu_image()
            detail.append(f"{image.name} ({image.id})")
        with phase("key pair") as detail:
            key = cloud.ensure_key_pair(run_id, tags)
            held = RunHandle(key_name=key.name)
            detail.append(key.name)
        with phase("security group") as detail:
            cidr = caller_cidr(settings)
            group = cloud.create_security_group(run_id, cidr, tags)
            held = RunHandle(key_name=key.name, security_group_id=group)
            detail.append(f"{group}: SSH from {cidr} only")
        ledger.update_run(
            run_id, handle={"key_name": key.name, "key_path": str(key.path), "security_group_id": group}
        )
        with phase("launch") as detail:
            instance_id = cloud.launch(
                LaunchRequest(
                    run_id=run_id,
                    instance_type=instance_type,
                    zone=None,
                    spot=True,
                    max_price=None,
                    disk_gb=SMOKE_DISK_GB,
                    image=image,
                    key=key,
                    security_group_id=group,
                    client_token=f"{run_id}-1",
                    tags=tags,
                )
            )
            held = RunHandle(instance_id=instance_id, key_name=key.name, security_group_id=group)
            result.instance_id = instance_id
            ledger.update_run(run_id, handle={"instance_id": instance_id})
            # recorded at once (at the estimate, the zone unknown): billed from here, whatever follows
            row = InstanceRow(
                id=instance_id,
                run_id=run_id,
                instance_type=instance_type,
                zone=None,
                lifecycle=Lifecycle.SPOT,
                price_per_hour=estimated_spot(on_demand),
                on_demand_per_hour=on_demand,
                launched_at=utcnow(),
                disk_gb=SMOKE_DISK_GB,
                ebs_per_gb_month=load_catalog().ebs_price(region),
            )
            ledger.record_instance(row)
            detail.append(f"{instance_id}: spot, IMDSv2 required")
        with phase("running") as detail:
            launched = cloud.wait_running(instance_id)
            result.zone = launched.zone
            price, source = _spot_price(cloud, instance_type, launched.zone, on_demand, settings.simulated)
            result.price_per_hour, result.price_source = price, source
            ledger.record_instance(replace(row, zone=launched.zone, price_per_hour=price))
            ledger.instance_running(instance_id, utcnow())
            detail.append(f"in {launched.zone}, ${price:.4f}/h ({source})")
        state(RunState.PROVISIONING, f"reaching {instance_id} over SSH")
        with phase("host key") as detail:
            _, endpoint = ssh_endpoint(cloud, instance_id, key.path, loopback_only=settings.loopback_hosts)
            detail.append(f"{len(endpoint.fingerprints)} fingerprint(s) from the console, pinned")
        with Session(endpoint).connect() as session:
            with phase("ssh") as detail:
                result.python = session.run("python3 --version").text.strip()
                detail.append(f"{endpoint.user}@{endpoint.host}, {result.python}")
            state(RunState.RUNNING, "the agent on the image's python3")
            with phase("agent") as detail:
                agent = RemoteAgent(session, "tensorflow", SMOKE_RUN_DIR)
                agent.cli = AgentCli("python3")  # the image's own: no job environment on it
                agent.install()
                agent.configure(None, gpu="no")
                deadline = iso(utcnow() + timedelta(hours=SMOKE_HOURS))
                agent.watchdog(deadline, 600.0, [], None, None)
                detail.append(f"installed, configured, watchdog until {deadline}")
            with phase("command") as detail:
                result.output = _run_command(agent, session)
                detail.append(result.output)
        with phase("teardown") as detail:
            result.left = teardown(cloud, ledger, run_id, held)
            held = RunHandle()
            detail.append("instance terminated (confirmed), group and key pair deleted")
        with phase("nothing left") as detail:
            result.left += _whatever_is_left(cloud, settings.owner, run_id)
            detail.append("none of the run's resources remain" if not result.left else ", ".join(result.left))
        if result.left:
            raise CloudError(
                f"the smoke test left: {', '.join(result.left)}",
                hint=f"Run `cloudtrain down {run_id}` or `cloudtrain gc`, and report it.",
            )
        outcome, exit_code = RunState.SUCCEEDED, 0
        return result
    except (KeyboardInterrupt, SystemExit) as e:
        outcome = RunState.CANCELLED
        exit_code = int(ExitCode.SIGTERM) if isinstance(e, SystemExit) else int(ExitCode.SIGINT)
        reporter.warn("interrupted: terminating the instance")
        raise
    except CloudtrainError as e:
        exit_code = int(e.exit_code)
        ledger.add_event(run_id, "error", e.message)
        raise
    except Exception as e:  # paramiko, OSError ...: recorded too, then raised
        ledger.add_event(run_id, "error", f"{type(e).__name__}: {e}")
        raise
    finally:
        with shielded_from_signals():
            try:
                if outcome is not RunState.SUCCEEDED:  # the run's tags find what `held` missed
                    problems = teardown(cloud, ledger, run_id, held)
                    if problems:
                        unremoved = "; ".join(problems)
                        reporter.warn(f"teardown incomplete: {unremoved}; run `cloudtrain down {run_id}`")
            finally:
                code = exit_code if exit_code is not None else int(ExitCode.CLOUD_OR_REMOTE)
                ledger.update_run(run_id, state=outcome, ended_at=utcnow(), exit_code=code)
                ledger.add_event(run_id, outcome.value, f"doctor --launch {outcome.value}")
                reporter.stage(outcome, f"doctor --launch {outcome.value}")


def _whatever_is_left(cloud: AwsCloud, owner: str, run_id: str) -> list[str]:
    """The run's resources still there after teardown; a terminated instance's root volume
    (DeleteOnTermination) may be listed a while yet, so volumes are given VOLUME_GONE_S."""
    deadline = time.monotonic() + VOLUME_GONE_S
    while True:
        left = cloud.owned_resources(owner, run_id)
        if not left or any(r.kind != "volume" for r in left) or time.monotonic() > deadline:
            return [f"{r.kind} {r.id}" for r in left]
        time.sleep(5.0)


def _spot_price(
    cloud: AwsCloud, instance_type: str, zone: str, on_demand: float, simulated: bool
) -> tuple[float, str]:
    """The spot price in ``zone`` now and where it comes from (a label, as the plan's); the
    simulator's quote is the catalog's (prices.catalog_spot)."""
    now = utcnow()
    quotes = [p for p in cloud.spot_prices([instance_type], [zone], now) if p.zone == zone]
    if quotes:
        latest = max(quotes, key=lambda p: p.timestamp)
        if price_problem(latest.price, on_demand, latest.timestamp, now) is None:
            if not simulated:
                return latest.price, "live"
            catalog = load_catalog()
            itype = catalog.cpu_type(instance_type)
            _, seen = catalog_spot(itype.spot.get(zone) if itype else None, on_demand)
            return latest.price, catalog_label(catalog) if seen else ESTIMATE_LABEL
    return estimated_spot(on_demand), ESTIMATE_LABEL


def _run_command(agent: RemoteAgent, session: Session) -> str:
    """Start COMMAND through the agent, follow it to its end, and return its output line."""
    session.run(f"mkdir -p {REMOTE_WORKDIR}")  # a run's synced workdir; empty here
    agent.start(COMMAND, None, {})
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    status = agent.status()
    while status.get("running") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = agent.status()
    if status.get("running"):
        raise RemoteError(f"the smoke test's command did not end within {COMMAND_TIMEOUT_S:.0f} s")
    log = session.run(f"cat {shlex.quote(SMOKE_RUN_DIR)}/train.log", check=False).text
    if status.get("exit_code") != 0:
        raise RemoteError(
            f"the smoke test's command failed (exit code {status.get('exit_code')}): {log.strip()[-300:]}"
        )
    supervisor = session.run(f"cat {shlex.quote(SMOKE_RUN_DIR)}/supervisor.log", check=False).text
    if status.get("imds_error") or "watching IMDS at" not in supervisor:
        why = status.get("imds_error") or "its spot-notice watcher did not start"
        raise RemoteError(
            f"the agent could not read the instance metadata (IMDSv2): {why}",
            hint="A run could not hear a spot interruption notice: check the way to 169.254.169.254.",
        )
    lines = [line for line in log.splitlines() if line.startswith("cloudtrain smoke test")]
    if not lines:
        raise RemoteError(f"the smoke test's command printed nothing expected: {log.strip()[-300:]}")
    return lines[-1]
