"""Teardown: remove everything a run made in the cloud (instances, spot requests, security
group, key pair, instance profile, a cluster's placement group), then record it; and the
signal shield it runs under.

Used by `run`, `down`, `gc` and `image build` alike. The cloud comes first: every removal
is tried before any ledger write, so a full disk cannot leave resources behind.
"""

from __future__ import annotations

import functools
import logging
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from cloudtrain.cloud.aws import AwsCloud
from cloudtrain.errors import CloudtrainError, LedgerError
from cloudtrain.ledger import Ledger
from cloudtrain.records import RunHandle

log = logging.getLogger(__name__)


@contextmanager
def shielded_from_signals(pending: Callable[[], str] | None = None) -> Iterator[None]:
    """Teardown must finish: a second Ctrl-C or SIGTERM is noted, not obeyed; the note says
    what is still to remove (``pending()``) and how, should this process be killed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def noted(*_: object) -> None:
        left = pending() if pending is not None else ""
        log.warning("teardown in progress: it finishes first%s", f"; still to remove: {left}" if left else "")

    for sig in signals:
        signal.signal(sig, noted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def teardown(
    cloud: AwsCloud,
    ledger: Ledger,
    run_id: str,
    handle: RunHandle,
) -> list[str]:
    """Terminate (confirmed) the run's instance (``handle.instance_id``) and any other the
    run's tag finds (a launch whose id never came back, a cluster's other nodes), then delete
    the handle's security group, key pair, instance profile and placement group (all but
    the profile also found by the run's tags, should the handle lack them), and, when all
    that worked, the local private key.
    Every step is attempted; returns what could not be removed.

    The cloud comes first: nothing is written to the ledger until every removal was tried
    (a full disk must not leave a group and a key pair behind). What cannot be recorded
    then raises a LedgerError that says the cloud part is done."""
    problems: list[str] = []
    terminated: list[tuple[str, datetime]] = []
    events: list[tuple[str, str]] = []  # (kind, message), recorded once the cloud is clean
    instance_id, security_group_id = handle.instance_id, handle.security_group_id
    key_name, instance_profile = handle.key_name, handle.instance_profile
    instances = [instance_id] if instance_id else []
    try:
        instances += [i.id for i in cloud.find_run_instances(run_id) if i.id not in instances]
    except CloudtrainError as e:
        problems.append(f"listing the run's instances: {e.message}")
    try:  # and each the ledger bills as running (a node that powered itself off, say): confirmed
        billed = [r.id for r in ledger.instances(run_id) if r.terminated_at is None]
        instances += [i for i in billed if i not in instances]
    except (LedgerError, sqlite3.Error) as e:
        log.warning("could not read the run's instances from the ledger: %s", e)
    if len(instances) > 1:  # several nodes shut down together, then each is confirmed
        cloud.ask_to_terminate(instances)
    for instance in instances:
        try:
            terminated_at = cloud.terminate(instance)
        except CloudtrainError as e:
            problems.append(f"instance {instance}: {e.message}")
            continue
        terminated.append((instance, terminated_at))
        events.append(("terminated", f"{instance} terminated (confirmed)"))
    try:  # what a Ctrl-C between a create call and its recording left unrecorded
        tagged = cloud.owned_resources(cloud.settings.owner, run_id)
    except CloudtrainError as e:
        problems.append(f"listing the run's resources: {e.message}")
        tagged = []
    security_group_id = security_group_id or next((r.id for r in tagged if r.kind == "security-group"), None)
    key_name = key_name or next((r.id for r in tagged if r.kind == "key-pair"), None)
    placement_groups = list(
        dict.fromkeys(  # a run on several nodes: one per launch of the group
            [*filter(None, [handle.placement_group]), *(r.id for r in tagged if r.kind == "placement-group")]
        )
    )
    for request in (r for r in tagged if r.kind == "spot-request"):
        try:
            cloud.cancel_spot_request(request.id)
        except CloudtrainError as e:
            problems.append(f"spot request {request.id}: {e.message}")
    steps: list[tuple[str | None, str, Callable[[str], object]]] = [
        (security_group_id, "security group", cloud.delete_security_group),
        (key_name, "key pair", cloud.delete_key_pair),
        (instance_profile, "instance profile", cloud.delete_instance_profile),
    ]
    for placement_group in placement_groups:  # a cluster's (its nodes are terminated by now)
        steps.append((placement_group, "placement group", cloud.delete_placement_group))
    for name, what, delete in steps:
        if not name:
            continue
        if problems and what != "key pair":  # a live instance still uses the groups and profile
            problems.append(f"{what} {name}: left while an instance may be running")
            continue
        try:
            delete(name)
        except CloudtrainError as e:
            problems.append(f"{what} {name}: {e.message}")
    if not problems and instance_profile:
        events.append(("instance-profile-deleted", f"{instance_profile} deleted"))
    if not problems:  # nothing left to reach: the private key goes too
        cloud.forget_private_key(run_id)
    events += [("teardown-incomplete", problem) for problem in problems]
    _record_teardown(ledger, run_id, terminated, events, problems)
    return problems


def _record_teardown(
    ledger: Ledger,
    run_id: str,
    terminated: list[tuple[str, datetime]],
    events: list[tuple[str, str]],
    problems: list[str],
) -> None:
    """Write what teardown did; every write is tried, and a failure is said, not hidden."""
    failed: list[str] = []
    writes: list[Callable[[], object]] = [
        functools.partial(ledger.instance_terminated, instance, at) for instance, at in terminated
    ]
    writes += [functools.partial(ledger.add_event, run_id, kind, message) for kind, message in events]
    for write in writes:
        try:
            write()
        except KeyError:  # an instance the ledger never heard of
            pass
        except (sqlite3.Error, OSError, CloudtrainError) as e:
            failed.append(str(e.message if isinstance(e, CloudtrainError) else e))
    if failed:
        left = f"left in the cloud: {'; '.join(problems)}" if problems else "nothing is left in the cloud"
        raise LedgerError(
            f"teardown of {run_id} ran ({left}), but the ledger could not record it: {failed[0]}",
            hint=f"Free space for {ledger.path}; until then `cloudtrain status` shows what it last "
            "recorded of the run"
            + (f", and `cloudtrain down {run_id}` removes the rest." if problems else "."),
        )
