"""``cloudtrain gc``: find what this owner's runs left in the cloud, and remove what is garbage.

That is this module's one job. A resource is found by its tags (``cloudtrain:owner`` is
this owner's, ``cloudtrain:run-id`` names its run): instances not yet terminated,
volumes, security groups, placement groups, key pairs, open or active spot requests, and
(IAM is global) the runs' instance profiles with their roles. It is garbage when

- the ledger knows its run has finished, or
- its ``cloudtrain:expires`` has passed: the one rule left for a run the ledger does not
  know (another CLOUDTRAIN_HOME's, or a deleted ledger);

and in either case the ledger does not keep it (``--keep``: a ``kept_until`` still to
come). Everything else stays: another owner's resource is never listed, and a live run
of this owner that has not expired (a run in another terminal, a concurrent test) is
left alone.

Removal follows teardown's order: spot requests cancelled (none can launch a
replacement), instances terminated and confirmed by describe_instances, then volumes,
security groups, placement groups and key pairs, and instance profiles last. A run with
an instance that could not be terminated keeps its groups, volumes and profile. A run the ledger knows
hears what happened as from teardown: its instances' termination times, events, and
an unfinished run leaves the active set (cancelled) only once describe_instances finds
none of its instances left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cloudtrain.cloud.aws import TAG_EXPIRES, AwsCloud, TaggedResource
from cloudtrain.errors import CloudtrainError
from cloudtrain.ledger import Ledger, RunRow
from cloudtrain.progress import Reporter
from cloudtrain.records import RunState, iso, parse_iso, utcnow
from cloudtrain.settings import Settings

log = logging.getLogger(__name__)

IAM_REGION = "global"  # where an instance profile is listed: IAM has no region
# The order of removal (and of the listing): nothing is deleted while something it
# depends on may still run.
KIND_ORDER = (
    "spot-request",
    "instance",
    "volume",
    "security-group",
    "placement-group",
    "key-pair",
    "instance-profile",
)

CloudFactory = Callable[[Settings, str], AwsCloud]


@dataclass(frozen=True)
class Leftover:
    """One resource of this owner's runs; ``why``: why it is garbage, or why it stays."""

    region: str
    kind: str
    id: str
    run_id: str
    why: str
    state: str = ""
    instance_id: str | None = None  # a volume's attachment, a spot request's instance

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "kind": self.kind,
            "id": self.id,
            "run_id": self.run_id,
            "why": self.why,
            "state": self.state or None,
        }


@dataclass(frozen=True)
class Survey:
    """What ``gc`` found: the garbage, and this owner's resources it leaves (``kept``)."""

    owner: str
    simulated: bool
    regions: tuple[str, ...]
    at: datetime
    garbage: tuple[Leftover, ...] = ()
    kept: tuple[Leftover, ...] = ()


@dataclass(frozen=True)
class Removal:
    """One garbage resource gc tried to remove; ``error`` None: removed."""

    leftover: Leftover
    error: str | None = None


@dataclass(frozen=True)
class GcResult:
    survey: Survey
    removals: tuple[Removal, ...] = ()

    @property
    def removed(self) -> list[Leftover]:
        return [r.leftover for r in self.removals if r.error is None]

    @property
    def failed(self) -> list[Removal]:
        return [r for r in self.removals if r.error is not None]

    def to_json(self) -> dict[str, Any]:
        """``gc --json``: every resource found, each with its status."""
        done = {(r.leftover.region, r.leftover.kind, r.leftover.id): r for r in self.removals}
        resources = []
        for item in self.survey.garbage:
            removal = done.get((item.region, item.kind, item.id))
            status = "garbage" if removal is None else "removed" if removal.error is None else "failed"
            error = removal.error if removal is not None else None
            resources.append({**item.to_json(), "status": status, "error": error})
        for item in self.survey.kept:
            resources.append({**item.to_json(), "status": "kept", "error": None})
        return {
            "schema": 1,
            "owner": self.survey.owner,
            "simulated": self.survey.simulated,
            "regions": list(self.survey.regions),
            "at": iso(self.survey.at),
            "garbage": len(self.survey.garbage),
            "removed": len(self.removed),
            "failed": len(self.failed),
            "kept": len(self.survey.kept),
            "resources": resources,
        }


def _time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return parse_iso(text)
    except ValueError:
        return None


def verdict(tags: Mapping[str, str], run: RunRow | None, now: datetime) -> tuple[bool, str]:
    """Whether a resource with ``tags`` is garbage, and why (or why it stays).

    ``run``: its run as this ledger knows it, None when the ledger does not."""
    kept_until = _time(run.handle.kept_until) if run is not None else None
    if kept_until is not None and kept_until > now:
        return False, f"kept until {iso(kept_until)}"
    if run is not None and run.state.finished:
        return True, f"run {run.state.value}"
    expires = _time(tags.get(TAG_EXPIRES))
    if expires is not None and expires <= now:
        return True, f"expired {iso(expires)}"
    whose = f"live run ({run.state.value})" if run is not None else "run not in this ledger"
    return False, f"{whose}, expires {iso(expires)}" if expires else f"{whose}, no expiry tag"


def _ordered(items: Iterable[Leftover], regions: tuple[str, ...]) -> tuple[Leftover, ...]:
    place = {region: i for i, region in enumerate((*regions, IAM_REGION))}
    return tuple(
        sorted(items, key=lambda x: (place.get(x.region, 0), KIND_ORDER.index(x.kind), x.run_id, x.id))
    )


class _Runs:
    """The ledger's runs by id, looked up once each; a run of the other world (a
    simulated run when gc looks at AWS, or the reverse) is not known."""

    def __init__(self, ledger: Ledger, simulated: bool) -> None:
        self.ledger = ledger
        self.simulated = simulated
        self._seen: dict[str, RunRow | None] = {}

    def get(self, run_id: str) -> RunRow | None:
        if run_id not in self._seen:
            row = self.ledger.get_run(run_id)
            self._seen[run_id] = row if row is not None and row.simulated == self.simulated else None
        return self._seen[run_id]


def survey(
    settings: Settings,
    ledger: Ledger,
    regions: tuple[str, ...],
    *,
    now: datetime | None = None,
    cloud_factory: CloudFactory = AwsCloud,
) -> Survey:
    """List this owner's cloudtrain resources in ``regions`` (and IAM), and judge each."""
    now = now or utcnow()
    runs = _Runs(ledger, settings.simulated)
    garbage: list[Leftover] = []
    kept: list[Leftover] = []

    def judge(region: str, found: TaggedResource) -> None:
        is_garbage, why = verdict(found.tags, runs.get(found.run_id), now)
        item = Leftover(region, found.kind, found.id, found.run_id, why, found.state, found.instance_id)
        (garbage if is_garbage else kept).append(item)

    clouds = {region: cloud_factory(settings, region) for region in regions}
    for region, cloud in clouds.items():
        for found in cloud.owned_resources(settings.owner):
            judge(region, found)
    for found in clouds[regions[0]].owned_instance_profiles(settings.owner):  # IAM: global
        run = runs.get(found.run_id)
        if run is not None and run.region and run.region not in regions:
            # its instances are in a region not looked at: the profile goes with them
            why = f"its run is in {run.region}, not looked at (--all-regions)"
            kept.append(Leftover(IAM_REGION, found.kind, found.id, found.run_id, why))
            continue
        judge(IAM_REGION, found)
    return Survey(
        owner=settings.owner,
        simulated=settings.simulated,
        regions=regions,
        at=now,
        garbage=_ordered(garbage, regions),
        kept=_ordered(kept, regions),
    )


def remove(
    settings: Settings,
    ledger: Ledger,
    found: Survey,
    *,
    reporter: Reporter | None = None,
    cloud_factory: CloudFactory = AwsCloud,
) -> GcResult:
    """Remove the survey's garbage in the safe order; every item is attempted, and what
    could not be removed comes back with its error (nothing is raised for it).

    A volume, security group, placement group or instance profile goes only once describe_instances finds
    no instance of its run left (by the run's tag, whoever's: one gc may not remove keeps
    them too)."""
    reporter = reporter or Reporter()
    clouds: dict[str, AwsCloud] = {}

    def cloud(region: str) -> AwsCloud:
        if region == IAM_REGION:
            region = found.regions[0]
        if region not in clouds:
            clouds[region] = cloud_factory(settings, region)
        return clouds[region]

    blocked: dict[str, str] = {}  # run id -> why what its instances use must stay
    checked: set[tuple[str, str]] = set()

    def check(region: str, run_id: str) -> None:
        """Whether the run still has an instance in ``region`` (after its instances went)."""
        if (region, run_id) in checked or run_id in blocked:
            return
        checked.add((region, run_id))
        try:
            live = cloud(region).find_run_instances(run_id, any_owner=True)
        except CloudtrainError as e:
            blocked[run_id] = f"could not list its run's instances: {e.message}"
            return
        if live:
            ids = ", ".join(f"{i.id} ({i.state})" for i in live)
            blocked[run_id] = f"its run's instance {ids} is still there"

    runs = _Runs(ledger, settings.simulated)
    removals: list[Removal] = []
    # found.garbage is in removal order: by region, then KIND_ORDER, IAM last
    for item in found.garbage:
        error: str | None = None
        if item.kind in _DEPENDENT:
            for region in found.regions if item.region == IAM_REGION else (item.region,):
                check(region, item.run_id)
        try:
            if item.kind in _DEPENDENT and item.run_id in blocked:
                raise _Left(f"left while {blocked[item.run_id]}")
            _remove_one(cloud(item.region), ledger, runs, item)
        except CloudtrainError as e:
            error = e.message
            if item.kind == "instance":
                blocked.setdefault(item.run_id, f"its run's instance {item.id} may still be running")
        if error is None:
            reporter.info(f"removed {item.kind} {item.id} ({item.run_id}, {item.region})")
        else:
            reporter.warn(f"could not remove {item.kind} {item.id} ({item.run_id}): {error}")
        removals.append(Removal(item, error))
    _settle_runs(ledger, runs, removals, cloud)
    return GcResult(found, tuple(removals))


# What a run's instances use: removed only once none of them is left.
_DEPENDENT = ("volume", "security-group", "placement-group", "instance-profile")


class _Left(CloudtrainError):
    """A resource gc leaves on purpose (what it depends on is still there)."""


def _remove_one(cloud: AwsCloud, ledger: Ledger, runs: _Runs, item: Leftover) -> None:
    if item.kind == "spot-request":
        cloud.cancel_spot_request(item.id)
    elif item.kind == "instance":
        terminated_at = cloud.terminate(item.id)  # confirmed by describe_instances
        with suppress(KeyError):  # an instance this ledger never heard of
            ledger.instance_terminated(item.id, terminated_at)
        if runs.get(item.run_id) is not None:
            message = f"{item.id} terminated (confirmed) by `cloudtrain gc`"
            ledger.add_event(item.run_id, "terminated", message)
    elif item.kind == "volume":
        cloud.delete_volume(item.id)
    elif item.kind == "security-group":
        cloud.delete_security_group(item.id)
    elif item.kind == "placement-group":
        cloud.delete_placement_group(item.id)
    elif item.kind == "key-pair":
        cloud.delete_key_pair(item.id)
    elif item.kind == "instance-profile":
        cloud.delete_instance_profile(item.id)
    else:  # pragma: no cover - the cloud layer lists only the kinds above
        raise _Left(f"gc does not know how to remove a {item.kind}")


def _settle_runs(
    ledger: Ledger, runs: _Runs, removals: list[Removal], cloud: Callable[[str], AwsCloud]
) -> None:
    """Tell the ledger what each run lost; forget private keys nothing can use any more."""
    from cloudtrain.runrecord import write_run_json

    by_run: dict[str, list[Removal]] = {}
    for removal in removals:
        by_run.setdefault(removal.leftover.run_id, []).append(removal)
    for run_id, mine in by_run.items():
        problems = [f"{r.leftover.kind} {r.leftover.id}: {r.error}" for r in mine if r.error is not None]
        run = runs.get(run_id)
        if not problems:  # nothing of the run left to reach with its key
            cloud(mine[0].leftover.region).forget_private_key(run_id)
        if run is None:
            continue  # not this ledger's: no events for a run it does not hold
        if problems:
            for problem in problems:
                ledger.add_event(run_id, "teardown-incomplete", problem)
            continue
        names = ", ".join(f"{r.leftover.kind} {r.leftover.id}" for r in mine)
        ledger.add_event(run_id, "gc", f"removed by `cloudtrain gc`: {names}")
        if not run.state.finished:
            _end_run(ledger, run, mine, cloud)
        elif run.handle.kept_until:
            ledger.update_run(run_id, handle={"kept_until": None})
        if run.run_dir and Path(run.run_dir).is_dir():
            write_run_json(ledger, run_id, Path(run.run_dir))


def _end_run(ledger: Ledger, run: RunRow, mine: list[Removal], cloud: Callable[[str], AwsCloud]) -> None:
    """An unfinished run whose resources expired leaves the active set (cancelled) once
    describe_instances finds none of its instances left."""
    region = run.region or next((r.leftover.region for r in mine if r.leftover.region != IAM_REGION), None)
    if region is None:
        ledger.add_event(run.id, "teardown-incomplete", "gc could not tell the run's region")
        return
    try:
        live = cloud(region).find_run_instances(run.id, any_owner=True)
    except CloudtrainError as e:
        ledger.add_event(run.id, "teardown-incomplete", f"listing the run's instances: {e.message}")
        return
    if live:
        ids = ", ".join(i.id for i in live)
        ledger.add_event(run.id, "teardown-incomplete", f"instances still there: {ids}")
        return
    ledger.update_run(run.id, state=RunState.CANCELLED, ended_at=utcnow(), handle={"kept_until": None})
    message = "run cancelled: it expired, and `cloudtrain gc` removed what it left"
    ledger.add_event(run.id, RunState.CANCELLED.value, message)
