"""The simulated cloud behind ``--dry-run``: a moto server plus one SSH host per instance.

Dry-run swaps endpoints, not code paths. ``ensure_simulator`` starts (or reuses) one
background simulator process per CLOUDTRAIN_HOME and returns ``Settings`` whose
``endpoint_url`` points every boto3 client at it. Inside that process:

- a moto server on 127.0.0.1 is the AWS API, with what moto leaves canned filled in:
  spot prices by the one simulated rule (catalog on-demand price x a fixed discount),
  each instance's console output (its simulated host's key fingerprints), and
  ClientToken idempotency for RunInstances; and what moto lacks: placement groups
  (CreatePlacementGroup, DescribePlacementGroups, DeletePlacementGroup, RunInstances'
  Placement.GroupName, the group's tags), and the instance profile on every instance of a
  RunInstances of several (moto gives it to the first only);
- each instance gets its own loopback address 127.0.0.N (N >= 2, unique among the live
  instances) as its private and public IP: what describe_instances says, and where its
  simulated host listens, so a cluster's nodes reach each other by their private IPs as
  on AWS, and a dry-run never names moto's 10.x addresses;
- the cloudtrain image is registered in every catalog region;
- each running instance becomes a ``SimHost`` (an SSH server on a port of its address,
  recorded in the instance's ``cloudtrain:ssh`` tag) whose commands run in a sandbox
  with a writable layer over the simulated image; terminating the instance stops the
  host and every process it started; the host's power-off hook terminates the
  instance in the simulated AWS (never a real poweroff);
- each host serves its instance's metadata (IMDSv2: instance-id, spot/instance-action,
  events/recommendations/rebalance) at ``CLOUDTRAIN_IMDS_ENDPOINT``. ``schedule_interruption``
  asks this process (through a request file in ``sim/control/``) to put a spot
  interruption notice there, now or later, and to terminate the instance in the
  simulated AWS ``CLOUDTRAIN_SIM_NOTICE_S`` seconds (default 120, AWS's two minutes)
  after the notice, the way the power-off hook does; or to terminate it with no notice
  at all (``notice=False``: a notice the agent never saw, a hardware failure); or to
  recommend a rebalance;
- the simulated IMDS serves no role credentials, so an instance launched with an
  instance profile gets, in its host's environment, what IMDS would hand it on AWS: the
  simulated role's credentials (``ASIASIMULATEDROLE`` / ``simulated-instance-role``,
  never the user's keys: this process holds none), the region, and ``AWS_ENDPOINT_URL``
  pointing at this moto server, whose S3 is the dry-run's S3. An instance launched
  without a profile gets none of these, as on AWS.

The process stops itself after an idle period with no live instance. ``simulated_aws``
runs the same moto server inside the calling process, for quick unit tests.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloudtrain.catalog import load_catalog
from cloudtrain.cloud.aws import TAG_SSH
from cloudtrain.errors import CloudError, InputError
from cloudtrain.prices import catalog_spot
from cloudtrain.records import iso, utcnow
from cloudtrain.settings import Settings

log = logging.getLogger(__name__)
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy

ACCOUNT_ID = "123456789012"  # moto's default account
IMAGE_NAME = "cloudtrain-gpu-simulated"

DEFAULT_IDLE_S = 600.0
NOTICE_ENV = "CLOUDTRAIN_SIM_NOTICE_S"
POLL_ENV = "CLOUDTRAIN_IMDS_POLL_S"  # passed on to each host (the agent's IMDS polling interval)
DEFAULT_NOTICE_S = 120.0  # AWS: a spot interruption notice comes two minutes ahead
INTERRUPTION_KINDS = ("terminate", "rebalance")
# The stand-in for IMDS's role credentials (see the module docstring): the simulated AWS
# accepts any key, and these are recognisably not a user's.
ROLE_CREDENTIALS = ("ASIASIMULATEDROLE", "simulated-instance-role")
_lock = threading.Lock()


# --- what moto leaves canned ----------------------------------------------------------


def _simulated_price_history(self: Any) -> Any:
    """DescribeSpotPriceHistory quoting the catalog's prices (prices.catalog_spot: its observed
    median for the zone, else the estimate) instead of moto's 0.00001 (2006)."""
    from moto.core.responses import ActionResult

    catalog = load_catalog()
    requested = self._get_param("InstanceTypes", [])
    offers = self.ec2_backend.describe_spot_price_history(requested, self._filters_from_querystring())
    now = iso(utcnow())
    history = []
    for offer in offers:
        itype = catalog.get(offer["InstanceType"]) or catalog.cpu_type(offer["InstanceType"])
        on_demand = itype.on_demand_price(self.region) if itype else None
        if itype is None or on_demand is None:
            continue
        history.append(
            {
                "InstanceType": offer["InstanceType"],
                "ProductDescription": "Linux/UNIX (Amazon VPC)",
                "SpotPrice": f"{catalog_spot(itype.spot.get(offer['Location']), on_demand)[0]:.6f}",
                "AvailabilityZone": offer["Location"],
                "Timestamp": now,
            }
        )
    return ActionResult({"SpotPriceHistory": history})


_console: dict[str, str] = {}  # instance id -> console output of its simulated host


def _console_output(self: Any) -> Any:
    from moto.core.responses import ActionResult
    from moto.ec2.utils import Base64EncodedString  # type: ignore[attr-defined]

    instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
    text = _console.get(instance.id, "")
    return ActionResult(
        {
            "InstanceId": instance.id,
            "Timestamp": utcnow(),
            "Output": Base64EncodedString.from_raw_string(text),
        }
    )


def _idempotent_run_instances(original: Any) -> Any:
    """RunInstances as EC2 does it: honouring ClientToken (a retry returns the first
    reservation; moto would make a second), refusing an unknown Placement.GroupName and
    recording a known one on the instances, the instance profile on each instance (moto
    associates it with the first only), and a loopback address for each."""

    def run_instances(self: Any) -> Any:
        from moto.core.responses import ActionResult
        from moto.ec2.exceptions import EC2ClientError

        token = self._get_param("ClientToken")
        if token:
            for reservation in list(self.ec2_backend.reservations.values()):
                if reservation.instances and reservation.instances[0].client_token == token:
                    return ActionResult(reservation)
        group_name = self._get_param("Placement.GroupName")
        group = _placement_groups(self.ec2_backend).get(group_name) if group_name else None
        if group_name and group is None:
            raise _unknown_group(group_name)
        count = int(self._get_param("MinCount", if_none="1"))
        with _addresses_lock:
            if len(_free_addresses()) < count:  # before moto makes any: all or none
                raise EC2ClientError(
                    "InsufficientInstanceCapacity",
                    f"The simulator has no loopback address left for {count} more instances "
                    f"(127.0.0.{FIRST_HOST}-{LAST_HOST}, {len(_addresses)} in use).",
                )
            result = original(self)
            launched = result.result.instances
            for instance in launched:
                if group is not None:
                    instance.placement.group_name = group.name
                    instance.placement.group_id = group.group_id
            _share_instance_profile(self, launched)
            for reservation in list(self.ec2_backend.reservations.values()):
                for instance in reservation.instances:
                    _loopback(instance)
        return result

    return run_instances


def _share_instance_profile(response: Any, instances: list[Any]) -> None:
    """Give every instance of a reservation the instance profile moto gave its first only."""
    name = response._get_param("IamInstanceProfile.Name")
    arn = response._get_param("IamInstanceProfile.Arn")
    if not (name or arn):
        return
    associations = getattr(response.ec2_backend, "iam_instance_profile_associations", {})
    for instance in instances[1:]:
        if instance.id not in associations:
            response.ec2_backend.associate_iam_instance_profile(
                instance_id=instance.id, iam_instance_profile_name=name, iam_instance_profile_arn=arn
            )


# --- what moto lacks: placement groups ---------------------------------------------------

PLACEMENT_STRATEGIES = ("cluster", "spread", "partition")
_GROUPS_ATTR = "_cloudtrain_placement_groups"
_GROUP_FIELDS = {"group-name": "name", "group-id": "group_id", "group-arn": "arn", "strategy": "strategy"}


@dataclass(frozen=True)
class _PlacementGroup:
    """One simulated placement group (its tags live in moto's tag store, by ``group_id``)."""

    name: str
    group_id: str
    strategy: str
    arn: str
    state: str = "available"


def _placement_groups(backend: Any) -> dict[str, _PlacementGroup]:
    """The placement groups of one moto EC2 backend (one account's region), by name. Kept on
    the backend, so a moto reset forgets them with everything else."""
    groups: dict[str, _PlacementGroup] = backend.__dict__.setdefault(_GROUPS_ATTR, {})
    return groups


def _unknown_group(name: str) -> Exception:
    from moto.ec2.exceptions import EC2ClientError

    return EC2ClientError("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")


def _group_data(backend: Any, group: _PlacementGroup) -> dict[str, Any]:
    tags = backend.tags.get(group.group_id, {})
    return {
        "GroupName": group.name,
        "GroupId": group.group_id,
        "GroupArn": group.arn,
        "State": group.state,
        "Strategy": group.strategy,
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
    }


def _group_matches(backend: Any, group: _PlacementGroup, name: str, values: list[str]) -> bool:
    """Whether ``group`` passes one DescribePlacementGroups filter (values may hold * and ?)."""
    from moto.ec2.exceptions import EC2ClientError

    tags: dict[str, str] = backend.tags.get(group.group_id, {})
    if name.startswith("tag:"):
        candidates = [tags[name[4:]]] if name[4:] in tags else []
    elif name == "tag-key":
        candidates = list(tags)
    elif name == "state":
        candidates = [group.state]
    elif name in _GROUP_FIELDS:
        candidates = [getattr(group, _GROUP_FIELDS[name])]
    else:
        raise EC2ClientError("InvalidParameterValue", f"The filter '{name}' is invalid")
    return any(fnmatch.fnmatchcase(c, v) for c in candidates for v in values)


def _create_placement_group(self: Any) -> Any:
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.utils import random_id

    name = self._get_param("GroupName")
    strategy = self._get_param("Strategy")
    if not name:
        raise EC2ClientError("MissingParameter", "The request must contain the parameter groupName")
    if strategy not in PLACEMENT_STRATEGIES:
        raise EC2ClientError(
            "InvalidParameterValue", f"Value ({strategy}) for parameter strategy is invalid."
        )
    tags = self._parse_tag_specification("placement-group").get("placement-group", {})
    self.error_on_dryrun()
    groups = _placement_groups(self.ec2_backend)
    if name in groups:
        raise EC2ClientError(
            "InvalidPlacementGroup.Duplicate", f"The placement group '{name}' already exists."
        )
    arn = f"arn:{self.partition}:ec2:{self.region}:{self.current_account}:placement-group/{name}"
    group = _PlacementGroup(name, random_id("pg"), strategy, arn)
    groups[name] = group
    if tags:
        self.ec2_backend.create_tags([group.group_id], tags)
    return ActionResult({"PlacementGroup": _group_data(self.ec2_backend, group)})


def _describe_placement_groups(self: Any) -> Any:
    from moto.core.responses import ActionResult

    names = self._get_param("GroupNames", [])
    ids = self._get_param("GroupIds", [])
    filters = self._filters_from_querystring()
    self.error_on_dryrun()
    groups = list(_placement_groups(self.ec2_backend).values())
    for wanted, have in ((names, {g.name for g in groups}), (ids, {g.group_id for g in groups})):
        for one in wanted:
            if one not in have:
                raise _unknown_group(one)
    found = [
        g
        for g in groups
        if (not names or g.name in names)
        and (not ids or g.group_id in ids)
        and all(_group_matches(self.ec2_backend, g, f, v) for f, v in filters.items())
    ]
    return ActionResult({"PlacementGroups": [_group_data(self.ec2_backend, g) for g in found]})


def _delete_placement_group(self: Any) -> Any:
    from moto.core.responses import EmptyResult
    from moto.ec2.exceptions import EC2ClientError

    name = self._get_param("GroupName")
    self.error_on_dryrun()
    groups = _placement_groups(self.ec2_backend)
    group = groups.get(name)
    if group is None:
        raise _unknown_group(name)
    members = [
        i
        for i in self.ec2_backend.all_instances()
        if i.placement.group_name == name and i._state.name != "terminated"
    ]
    if members:
        raise EC2ClientError(
            "InvalidPlacementGroup.InUse", f"The placement group '{name}' is in use and may not be deleted."
        )
    del groups[name]
    self.ec2_backend.tags.pop(group.group_id, None)
    return EmptyResult()


# --- each instance's own loopback address ---------------------------------------------------

FIRST_HOST, LAST_HOST = 2, 254  # 127.0.0.1 is the simulator's own (moto, SimHost's default)
_addresses: dict[str, Any] = {}  # 127.0.0.N -> the moto instance that has it
_addresses_lock = threading.RLock()  # moto's server answers each request in a thread


def _free_addresses() -> list[str]:
    """The 127.0.0.N no live instance has, in order (a terminated instance's is free again)."""
    with _addresses_lock:
        for address, instance in list(_addresses.items()):
            if instance._state.name == "terminated":
                del _addresses[address]
        return [f"127.0.0.{n}" for n in range(FIRST_HOST, LAST_HOST + 1) if f"127.0.0.{n}" not in _addresses]


_last_request = [time.monotonic()]  # when the simulated AWS last answered a call


def _noting_requests(original: Any) -> Any:
    def call(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        _last_request[0] = time.monotonic()
        return original(self, environ, start_response)

    return call


_MISSING = object()


@contextmanager
def patched_moto() -> Iterator[None]:
    """moto (in this process: its server, or an in-process ``mock_aws``) as the simulator
    completes it: the calls it fills in or adds (see the module docstring), until the end
    of the block. Each block starts with no loopback address handed out."""
    from moto.ec2 import utils as ec2_utils
    from moto.ec2.responses import EC2Response
    from moto.ec2.responses.general import General
    from moto.ec2.responses.instances import InstanceResponse
    from moto.ec2.responses.spot_instances import SpotInstances
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    patches = [
        (DomainDispatcherApplication, "__call__", _noting_requests(DomainDispatcherApplication.__call__)),
        (SpotInstances, "describe_spot_price_history", _simulated_price_history),
        (General, "get_console_output", _console_output),
        (InstanceResponse, "run_instances", _idempotent_run_instances(InstanceResponse.run_instances)),
        (EC2Response, "create_placement_group", _create_placement_group),
        (EC2Response, "describe_placement_groups", _describe_placement_groups),
        (EC2Response, "delete_placement_group", _delete_placement_group),
    ]
    saved = [(cls, name, cls.__dict__.get(name, _MISSING)) for cls, name, _ in patches]
    for cls, name, replacement in patches:
        setattr(cls, name, replacement)
    # pg-... ids are EC2 resource ids to moto's tags (CreateTags, DescribeTags) from now on
    ec2_utils.EC2_RESOURCE_TO_PREFIX["placement-group"] = "pg"
    ec2_utils.EC2_PREFIX_TO_RESOURCE["pg"] = "placement-group"
    with _addresses_lock:
        _addresses.clear()
    try:
        yield
    finally:
        for cls, name, original in saved:
            if original is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        ec2_utils.EC2_RESOURCE_TO_PREFIX.pop("placement-group", None)
        ec2_utils.EC2_PREFIX_TO_RESOURCE.pop("pg", None)
        with _addresses_lock:
            _addresses.clear()


@contextmanager
def _moto_server() -> Iterator[str]:
    """A moto server on a free loopback port, reset to empty; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with patched_moto():
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # moto's state lives in this process: start each simulated cloud empty.
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
        _LOOPBACK.open(reset, timeout=10).close()
        _set_up_account()
        try:
            yield endpoint
        finally:
            server.stop()


def _set_up_account() -> None:
    """What a user sets up once in an account before a first run on AWS (README): the
    permissions boundary of the runs' roles (permissions.py). Straight into moto's IAM,
    which serves from this process (a client's start-up would cost each server 0.2 s)."""
    from moto.iam.models import iam_backends

    from cloudtrain.permissions import BOUNDARY_POLICY_NAME, boundary_policy, dumps

    iam_backends[ACCOUNT_ID]["global"].create_policy(
        description="The most a cloudtrain run's role may do",
        path="/",
        policy_document=dumps(boundary_policy()),
        policy_name=BOUNDARY_POLICY_NAME,
        tags=[],
    )


@contextmanager
def simulated_aws(settings: Settings) -> Iterator[Settings]:
    """The simulated AWS API inside this process (no hosts): for unit tests of the cloud layer."""
    with _lock, _moto_server() as endpoint:
        yield _simulated_settings(settings, endpoint)


def _simulated_settings(settings: Settings, endpoint: str) -> Settings:
    return settings.with_(
        endpoint_url=endpoint,
        simulated=True,
        ssh_cidr="127.0.0.1/32",
        profile=None,
        instance_gpus=False,  # the simulated hosts train on the CPU
        loopback_hosts=True,  # a dry-run sends nothing off loopback
    )


# --- the background process -------------------------------------------------------------


def sim_dir(settings: Settings) -> Path:
    return settings.home / "sim"


def _read_state(settings: Settings) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((sim_dir(settings) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state


def _alive(pid: int) -> bool:
    with suppress(ChildProcessError):  # our own child: reap it if it exited (no zombie)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(endpoint: str) -> bool:
    try:
        _LOOPBACK.open(f"{endpoint}/moto-api/", timeout=2).close()
    except OSError:
        return False
    return True


def simulator_status(settings: Settings) -> dict[str, Any] | None:
    """The running simulator's state (pid, endpoint, image, started_at), or None."""
    state = _read_state(settings)
    if state and _alive(int(state["pid"])) and _answers(state["endpoint"]):
        return state
    return None


SIM_PACKAGES = ("moto", "asyncssh")  # the `sim` extra: the simulated AWS and its hosts' SSH servers


def require_simulator() -> None:
    """Refuse a dry-run (InputError, exit 2) where the `sim` extra is not installed, before
    anything starts: `pip install cloudtrain` alone is for AWS."""
    import importlib.util

    missing = [name for name in SIM_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(
            f"--dry-run needs the simulator, and this install lacks {', '.join(missing)}",
            hint="Install the sim extra: pip install 'cloudtrain[sim]' (in a checkout: pip install '.[sim]')",
        )


def ensure_simulator(
    settings: Settings, *, image: Path | None = None, idle_s: float | None = None, timeout: float = 60.0
) -> Settings:
    """Start the simulator for this CLOUDTRAIN_HOME unless it runs; settings pointing at it.

    ``image``: the simulated image new instances boot from (``simimage.ensure_image``).
    """
    from filelock import FileLock

    require_simulator()
    folder = sim_dir(settings)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(folder / "lock")):
        if image is not None:
            (folder / "image").write_text(str(image))
        state = simulator_status(settings)
        if state is None:
            state = _spawn(settings, idle_s, timeout)
    return _simulated_settings(settings, state["endpoint"])


def _spawn(settings: Settings, idle_s: float | None, timeout: float) -> dict[str, Any]:
    folder = sim_dir(settings)
    (folder / "state.json").unlink(missing_ok=True)
    idle = idle_s if idle_s is not None else float(os.environ.get("CLOUDTRAIN_SIM_IDLE_S", DEFAULT_IDLE_S))
    command = [sys.executable, "-m", "cloudtrain.cloud.simulator", "serve", "--home", str(settings.home)]
    command += ["--idle", str(idle)]
    env = simulator_environment(os.environ)
    # AWS's public base images, as moto's own list lacks a current one: `image build` finds its
    # base by name and owner with the same call on both clouds.
    env["MOTO_AMIS_PATH"] = str(Path(__file__).with_name("sim_amis.json"))
    with open(folder / "sim.log", "ab") as logfile:
        process = subprocess.Popen(
            command,
            # `-m` puts the current folder first on sys.path: from a checkout's root that is the
            # source tree, not the installed package (where ami/ is cloudtrain.ami). A daemon
            # keeps no user's folder anyway.
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            close_fds=True,
        )
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            tail = (folder / "sim.log").read_text(errors="replace")[-2000:]
            raise CloudError(f"the simulator exited at start:\n{tail}", hint=f"See {folder / 'sim.log'}.")
        state = _read_state(settings)
        if state and state.get("pid") == process.pid:
            return state
        time.sleep(0.1)
    process.kill()
    raise CloudError("the simulator did not start in time", hint=f"See {folder / 'sim.log'}.")


# What the simulator process gets of the controller's environment: what a shell and this
# package need, never the user's AWS keys, the job's secrets or anything else of theirs.
_PASSED_TO_SIMULATOR = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "PYTHONPATH")


def simulator_environment(source: Mapping[str, str]) -> dict[str, str]:
    """The simulator's environment: an allow-list (see above), locale and CLOUDTRAIN_* settings."""
    return {
        name: value
        for name, value in source.items()
        if name in _PASSED_TO_SIMULATOR or name.startswith(("LC_", "CLOUDTRAIN_"))
    }


def stop_simulator(settings: Settings, timeout: float = 30.0) -> bool:
    """Stop this home's simulator (its hosts and their processes too); False if none ran."""
    state = _read_state(settings)
    if not state or not _alive(int(state["pid"])):
        return False
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    (sim_dir(settings) / "state.json").unlink(missing_ok=True)
    return True


# --- the control channel: interruptions the controller schedules ---------------------------


def control_dir(settings: Settings) -> Path:
    return sim_dir(settings) / "control"


def notice_period() -> float:
    """Seconds from a spot interruption notice to the instance's termination:
    $CLOUDTRAIN_SIM_NOTICE_S, default 120 (AWS's two minutes)."""
    text = os.environ.get(NOTICE_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_NOTICE_S
    except ValueError:
        raise CloudError(
            f"{NOTICE_ENV}={text!r} is not a number of seconds", hint=f"Set {NOTICE_ENV}=120, or unset it."
        ) from None
    if not value >= 0:
        raise CloudError(f"{NOTICE_ENV} must be 0 or more, not {text}", hint=f"Set {NOTICE_ENV}=120.")
    return value


def schedule_interruption(
    settings: Settings,
    instance_id: str,
    *,
    delay_s: float = 0.0,
    kind: str = "terminate",
    notice_s: float | None = None,
    notice: bool = True,
    timeout: float = 15.0,
) -> dict[str, Any]:
    """Make this home's running simulator interrupt a simulated spot instance, as EC2 would.

    ``kind="terminate"``: ``delay_s`` seconds from now the instance's IMDS starts to answer
    ``spot/instance-action`` with ``{"action": "terminate", "time": T}``, where T is the
    notice time plus ``notice_s`` (default ``$CLOUDTRAIN_SIM_NOTICE_S``, else 120 s); at
    T the simulator terminates the instance in the simulated AWS, which stops its host
    and every process on it (the same path as the power-off hook). With ``notice=False``
    IMDS never shows a notice: ``delay_s`` seconds from now the instance is simply
    terminated (``notice_s`` does not apply). ``kind="rebalance"``:
    ``delay_s`` seconds from now ``events/recommendations/rebalance`` answers
    ``{"noticeTime": ...}``; nothing is terminated. A notice due while the instance is
    still pending appears once its host is up.

    The request goes through a file in ``sim/control/`` that the simulator's loop picks
    up within a quarter of a second; this returns once the simulator accepted it:
    ``{"instance_id", "kind", "notice_at", "action_at"}`` (ISO UTC; ``action_at`` is
    None for a rebalance). Raises ``CloudError`` when no simulator runs for this home,
    the instance is unknown or no longer pending/running, or the simulator does not
    answer within ``timeout`` seconds.
    """
    if kind not in INTERRUPTION_KINDS:
        raise ValueError(f"kind must be one of {INTERRUPTION_KINDS}, not {kind!r}")
    if delay_s < 0:
        raise ValueError(f"delay_s must be 0 or more, not {delay_s}")
    period = notice_period() if notice_s is None else float(notice_s)
    if period < 0:
        raise ValueError(f"notice_s must be 0 or more, not {notice_s}")
    if simulator_status(settings) is None:
        raise CloudError(
            f"cannot schedule an interruption of {instance_id}: no simulator runs for {settings.home}",
            hint="Interruptions are simulated only in a --dry-run whose simulator is up.",
        )
    folder = control_dir(settings)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = uuid.uuid4().hex
    request = {
        "instance_id": instance_id,
        "kind": kind,
        "notice_at": time.time() + delay_s,
        "notice_s": period if notice else 0.0,
        "notice": bool(notice),
    }
    tmp = folder / f"{name}.tmp"
    tmp.write_text(json.dumps(request))
    os.replace(tmp, folder / f"{name}.request")
    answer = folder / f"{name}.response"
    end = time.monotonic() + timeout
    while not answer.exists():
        if time.monotonic() > end:
            (folder / f"{name}.request").unlink(missing_ok=True)
            raise CloudError(
                f"the simulator did not take the interruption of {instance_id} within {timeout:g} s",
                hint=f"See {sim_dir(settings) / 'sim.log'}.",
            )
        time.sleep(0.05)
    response: dict[str, Any] = json.loads(answer.read_text())
    answer.unlink(missing_ok=True)
    if not response.get("ok"):
        raise CloudError(
            f"the simulator cannot interrupt {instance_id}: {response.get('error')}",
            hint="Schedule interruptions of a pending or running simulated instance.",
        )
    return {key: response.get(key) for key in ("instance_id", "kind", "notice_at", "action_at")}


@dataclass
class _Interruption:
    """One scheduled interruption inside the simulator (times are time.time())."""

    instance_id: str
    kind: str  # "terminate" | "rebalance"
    notice_at: float  # with notice=False: when it is terminated
    notice_s: float
    notice: bool = True  # False: IMDS shows nothing, the instance is just gone at notice_at
    action_at: float | None = None  # set once the notice is served


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


class _World:
    """The simulator's process: keeps one SimHost per running moto instance."""

    def __init__(self, home: Path, endpoint: str, idle_s: float) -> None:
        self.home = home
        self.endpoint = endpoint
        self.idle_s = idle_s
        self.hosts: dict[str, Any] = {}  # instance id -> SimHost
        self.stopping = threading.Event()
        self.interruptions: list[_Interruption] = []

    @property
    def image(self) -> str:
        """The simulated image's prefix, as the controller last named it (sim/image)."""
        try:
            return (self.home / "sim" / "image").read_text().strip()
        except OSError:
            return ""

    def backends(self) -> list[Any]:
        from moto.ec2.models import ec2_backends

        return [ec2_backends[ACCOUNT_ID][region] for region in load_catalog().regions]

    def register_images(self) -> None:
        """The simulated cloudtrain image in every region, of the installed recipe's version
        (so a plain ``run --dry-run`` finds a current image, as after ``image build`` on AWS)."""
        from cloudtrain.cloud.aws import TAG_IMAGE_VERSION
        from cloudtrain.cloud.simimage import recipe_version

        for backend in self.backends():
            if not backend.describe_images(filters={"name": [IMAGE_NAME]}):
                image = backend.register_image(name=IMAGE_NAME, description="cloudtrain simulated image")
                backend.create_tags([image.id], {TAG_IMAGE_VERSION: recipe_version()})

    def step(self) -> None:
        for backend in self.backends():
            for instance in list(backend.all_instances()):
                state = instance._state.name
                host = self.hosts.get(instance.id)
                if state == "running" and host is None:
                    try:
                        self.start_host(backend, instance)
                    except Exception:
                        log.exception("%s: cannot start its simulated host", instance.id)
                        self.hosts[instance.id] = _NoHost()
                elif state != "running" and host is not None:
                    self.stop_host(instance.id)
                elif host is not None and host.poweroff_requested():
                    log.info("%s powered itself off", instance.id)
                    self.take_down(backend, instance)

    def take_down(self, backend: Any, instance: Any) -> None:
        """Terminate an instance as EC2 does: ``shutting-down`` at once (what describe_instances
        tells a controller whose connection just broke), then its host and every process on it
        stop, then ``terminated`` (once AWS says so, nothing answers)."""
        instance._state.name, instance._state.code = "shutting-down", 32
        self.stop_host(instance.id)
        backend.terminate_instances([instance.id])

    def start_host(self, backend: Any, instance: Any) -> None:
        from cloudtrain.cloud.simhost import LOOPBACK, HostSpec, SimHost

        pair = backend.key_pairs.get(instance.key_name) if instance.key_name else None
        if pair is None:
            log.warning("%s has no key pair: no SSH host", instance.id)
            self.hosts[instance.id] = _NoHost()
            return
        sandbox = self.home / "sim" / "instances" / instance.id
        layer = make_layer(Path(self.image), sandbox) if self.image else []
        env = {"CLOUDTRAIN_ROOT": str(sandbox)}
        if self.image:  # where `image build` provisions on a simulated builder: the simulated image
            env["CLOUDTRAIN_IMAGE_PREFIX"] = self.image
        if os.environ.get(POLL_ENV):  # tests: the agent's watcher polls IMDS faster than every 5 s
            env[POLL_ENV] = os.environ[POLL_ENV]
        profile = instance_profile_name(backend, instance.id)
        if profile:
            env.update(self.role_environment(backend.region_name))
            log.info("%s: instance profile %s (simulated role credentials)", instance.id, profile)
        spec = HostSpec(
            instance_id=instance.id,
            sandbox=sandbox,
            authorized_key=_text(pair.material_public),
            env=env,
            path_prefix=layer,
            address=_loopback(instance) or LOOPBACK,  # its private IP: where the others reach it
        )
        host = SimHost(spec)
        host.start()
        self.hosts[instance.id] = host
        # The tag first: once the console shows fingerprints, the endpoint is there too.
        backend.create_tags([instance.id], {TAG_SSH: f"{host.host}:{host.port}"})
        _console[instance.id] = _faulty_console(host.console_output(), host.host_key_fingerprints())
        log.info("%s: simulated host on %s:%d", instance.id, host.host, host.port)

    def role_environment(self, region: str) -> dict[str, str]:
        """What IMDS would give an instance with a profile: role credentials, region, endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": region,
            "AWS_ACCESS_KEY_ID": ROLE_CREDENTIALS[0],
            "AWS_SECRET_ACCESS_KEY": ROLE_CREDENTIALS[1],
        }

    def stop_host(self, instance_id: str) -> None:
        host = self.hosts.pop(instance_id, None)
        if host is not None:
            host.stop()
            log.info("%s: simulated host stopped", instance_id)

    def idle(self) -> bool:
        """No live host, and no AWS call for ``idle_s``."""
        if any(not isinstance(h, _NoHost) for h in self.hosts.values()):
            return False
        return time.monotonic() - _last_request[0] > self.idle_s

    # --- interruptions ------------------------------------------------------------------

    def find_instance(self, instance_id: str) -> tuple[Any, Any] | None:
        """(backend, instance) of an instance id, in any catalog region."""
        for backend in self.backends():
            for instance in backend.all_instances():
                if instance.id == instance_id:
                    return backend, instance
        return None

    def take_requests(self) -> None:
        """Answer each request file schedule_interruption left in sim/control/."""
        folder = self.home / "sim" / "control"
        try:
            requests = sorted(folder.glob("*.request"))
        except OSError:
            return
        for path in requests:
            try:
                request = json.loads(path.read_text())
                response = self.accept(request)
            except Exception as e:  # a bad request gets an answer, never kills the loop
                log.exception("bad control request %s", path.name)
                response = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            with suppress(OSError):
                path.unlink()
                tmp = path.with_suffix(".tmp-response")
                tmp.write_text(json.dumps(response))
                os.replace(tmp, path.with_suffix(".response"))

    def accept(self, request: dict[str, Any]) -> dict[str, Any]:
        instance_id, kind = str(request["instance_id"]), str(request["kind"])
        if kind not in INTERRUPTION_KINDS:
            return {"ok": False, "error": f"unknown kind {kind!r}"}
        found = self.find_instance(instance_id)
        if found is None:
            return {"ok": False, "error": f"no instance {instance_id} in the simulated AWS"}
        state = found[1]._state.name
        if state not in ("pending", "running"):
            return {"ok": False, "error": f"instance {instance_id} is {state}"}
        notice = bool(request.get("notice", True)) or kind != "terminate"
        item = _Interruption(
            instance_id, kind, float(request["notice_at"]), float(request["notice_s"]), notice=notice
        )
        self.interruptions.append(item)
        if notice:
            log.info(
                "%s: %s scheduled: notice at %s%s",
                instance_id,
                kind,
                iso(_utc(item.notice_at)),
                f", terminated {item.notice_s:g} s later" if kind == "terminate" else "",
            )
        else:
            log.info("%s: terminate scheduled at %s, with no notice", instance_id, iso(_utc(item.notice_at)))
        action_at = item.notice_at + item.notice_s if kind == "terminate" else None
        return {
            "ok": True,
            "instance_id": instance_id,
            "kind": kind,
            "notice_at": iso(_utc(item.notice_at)),
            "action_at": iso(_utc(action_at)) if action_at is not None else None,
        }

    def interrupt(self) -> None:
        """Serve the notices that are due, and terminate the instances whose notice ran out."""
        now = time.time()
        keep = []
        for item in self.interruptions:
            found = self.find_instance(item.instance_id)
            state = found[1]._state.name if found else "gone"
            if state not in ("pending", "running"):
                log.info("%s is %s: its scheduled %s is dropped", item.instance_id, state, item.kind)
                continue
            if item.action_at is None:
                host = self.hosts.get(item.instance_id)
                if now < item.notice_at or host is None:
                    keep.append(item)  # not due, or its host is not up yet
                    continue
                imds = getattr(host, "imds", None)  # _NoHost has none: nothing to serve
                if item.kind == "rebalance":
                    if imds is not None:
                        imds.recommend_rebalance(_utc(now))
                    log.info("%s: rebalance recommended", item.instance_id)
                    continue
                if not item.notice:  # gone, and nothing on the instance saw it coming
                    item.action_at = now
                    log.info("%s: taken away with no notice", item.instance_id)
                else:
                    item.action_at = now + item.notice_s
                    if imds is not None:
                        imds.schedule_instance_action("terminate", _utc(item.action_at))
                    at = iso(_utc(item.action_at))
                    log.info("%s: spot interruption notice, terminate at %s", item.instance_id, at)
            if now < item.action_at:
                keep.append(item)
                continue
            assert found is not None
            log.info("%s: spot interruption: terminating", item.instance_id)
            self.take_down(*found)
        self.interruptions = keep

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            for work in (self.take_requests, self.step, self.interrupt):
                try:
                    work()
                except Exception:  # a bad step must not kill every host
                    log.exception("simulator %s failed", work.__name__)
            if self.idle():
                log.info("idle for %.0f s: stopping", self.idle_s)
                break
        for instance_id in list(self.hosts):
            self.stop_host(instance_id)


class _NoHost:
    def stop(self) -> None:
        pass

    def poweroff_requested(self) -> bool:
        return False


def _faulty_console(console: str, fingerprints: list[str]) -> str:
    """With CLOUDTRAIN_SIM_FAULT=host-key-mismatch (tests), print other keys' fingerprints:
    what a man-in-the-middle looks like from the controller."""
    if os.environ.get("CLOUDTRAIN_SIM_FAULT") != "host-key-mismatch":
        return console
    import asyncssh

    for line in fingerprints:
        for word in line.split():
            if word.startswith("SHA256:"):
                other = asyncssh.generate_private_key("ssh-ed25519").get_fingerprint("sha256")
                console = console.replace(word, other)
    return console


def instance_profile_name(backend: Any, instance_id: str) -> str | None:
    """The instance profile an instance was launched with (moto records RunInstances'
    IamInstanceProfile as an association, not on the instance)."""
    association = getattr(backend, "iam_instance_profile_associations", {}).get(instance_id)
    profile = getattr(association, "iam_instance_profile", None)
    name = getattr(profile, "name", None)
    return str(name) if name else None


def _loopback(instance: Any) -> str | None:
    """The instance's own loopback address 127.0.0.N, given on first sight: its private IP
    (and its public IP, where it has one) from then on, never the random ones moto invents,
    which nothing may ever dial. None for a terminated instance that never had one."""
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.utils import generate_dns_from_ip

    nics = getattr(instance, "nics", {})
    nic = nics.get(0)
    if nic is None:
        return None
    with _addresses_lock:
        if _addresses.get(nic.private_ip_address) is instance:
            return str(nic.private_ip_address)
        if instance._state.name == "terminated":
            return None
        free = _free_addresses()
        if not free:
            raise EC2ClientError(
                "InsufficientInstanceCapacity",
                f"The simulator has no loopback address left for {instance.id}.",
            )
        address = free[0]
        _addresses[address] = instance
    nic.private_ip_address = address
    for entry in nic.private_ip_addresses:
        if entry.get("Primary"):
            entry["PrivateIpAddress"] = address
            if "PrivateDnsName" in entry:
                entry["PrivateDnsName"] = generate_dns_from_ip(address)
    if getattr(nic, "private_dns_name", None):
        nic.private_dns_name = generate_dns_from_ip(address)
    for other in nics.values():  # moto's invented public IPs: loopback too
        if getattr(other, "public_ip", None):
            other.public_ip = address
    return address


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def make_layer(image: Path, sandbox: Path) -> list[str]:
    """A writable layer over each image environment: a venv whose .pth sees the image's packages,
    with the image environment's console scripts (pip, ...), and a link to the image's warmed
    Theano compile cache.

    The layer is the job's environment as an instance of the image offers it: ``pip`` and
    ``python -m pip`` install into the layer, never into the image, and the console scripts a
    package installs land in the layer's bin/, on PATH. Returns the layer's bin folders for
    PATH (the first environment first).
    """
    bins = []
    envs = image / "envs"
    for env in sorted(envs.iterdir()) if envs.is_dir() else []:
        python = env / "bin" / "python"
        if not python.exists():
            continue
        layer = sandbox / "envs" / env.name
        if not (layer / "bin" / "python").exists():
            subprocess.run([str(python), "-m", "venv", "--without-pip", str(layer)], check=True)
            Path(_purelib(layer / "bin" / "python"), "cloudtrain_image.pth").write_text(
                _purelib(python) + "\n"
            )
            _mirror_scripts(env / "bin", layer / "bin")
        bins.append(str(layer / "bin"))
    cache = image / "theano-cache"  # read-only, like the image: the agent copies it per run
    if cache.is_dir() and not (sandbox / "theano-cache").exists():
        (sandbox / "theano-cache").symlink_to(cache, target_is_directory=True)
    return bins


def _purelib(python: Path) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


# A console script's first line names its interpreter: "#!PYTHON"; where that line would be too
# long for the kernel (127 bytes) or hold a space, pip writes the /bin/sh form below instead.
_SH_EXEC = re.compile(rb"\A#!/bin/sh\n'''exec' \"([^\"\n]+)\" \"\$0\" \"\$@\"\n' '''\n")


def _script_header(python: str) -> bytes:
    if len(python) + 3 <= 127 and " " not in python:
        return f"#!{python}\n".encode()
    return b"#!/bin/sh\n'''exec' \"" + python.encode() + b'" "$0" "$@"\n\' \'\'\'\n'


def _mirror_scripts(image_bin: Path, layer_bin: Path) -> None:
    """Copy the image environment's console scripts into the layer, run by the layer's Python."""
    layer_python = str(layer_bin / "python")
    for script in sorted(image_bin.iterdir()):
        if script.name.startswith(("python", "activate", "Activate")) or not script.is_file():
            continue
        if (layer_bin / script.name).exists():
            continue
        text = script.read_bytes()
        found = _SH_EXEC.match(text)
        if found:
            interpreter, body = found.group(1).decode(errors="replace"), text[found.end() :]
        elif text.startswith(b"#!"):
            first, _, body = text.partition(b"\n")
            interpreter = first[2:].decode(errors="replace").strip()
        else:
            continue
        if Path(interpreter).parent != image_bin or not Path(interpreter).name.startswith("python"):
            continue  # not one of this environment's Python scripts
        target = layer_bin / script.name
        target.write_bytes(_script_header(layer_python) + body)
        target.chmod(0o755)


def serve(home: Path, idle_s: float) -> int:
    """The simulator process: moto server + hosts, until idle, SIGTERM or SIGINT."""
    folder = home / "sim"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with _moto_server() as endpoint:
        world = _World(home, endpoint, idle_s)

        def stop(signum: int, frame: object) -> None:
            world.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        world.register_images()
        state = {"schema": 1, "pid": os.getpid(), "endpoint": endpoint, "started_at": iso(utcnow())}
        tmp = folder / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, folder / "state.json")
        log.info("simulator %d serving AWS at %s", os.getpid(), endpoint)
        try:
            world.run()
        finally:
            with suppress(OSError):
                current = json.loads((folder / "state.json").read_text())
                if current.get("pid") == os.getpid():
                    (folder / "state.json").unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudtrain.cloud.simulator")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run the simulated cloud (started by the CLI)")
    serve_parser.add_argument("--home", type=Path, required=True)
    serve_parser.add_argument("--idle", type=float, default=DEFAULT_IDLE_S)
    args = parser.parse_args(argv)
    return serve(args.home, args.idle)


if __name__ == "__main__":
    sys.exit(main())
