"""AWS through boto3: spot prices, key pairs, security groups, placement groups, images,
launch (one instance, or a cluster of N in one call), terminate.

The only module (with its siblings in ``cloudtrain.cloud``) that imports boto3. Clients
are made from ``Settings`` when needed, never at import time, so the dry-run
simulator can point them at its own endpoint. botocore's standard retry mode handles
throttling; every ``ClientError`` that reaches the user becomes a ``CloudtrainError``
with a hint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
import types
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    WaiterError,
)

from cloudtrain.errors import (
    CapacityError,
    CloudError,
    CloudtrainError,
    CredentialsError,
    InputError,
    PriceError,
    QuotaError,
)
from cloudtrain.errors import NoCredentialsError as NoCredentials
from cloudtrain.permissions import (
    BOUNDARY_POLICY_NAME,
    PASS_THROUGH,
    RECORD_ENV,
    actions_for,
    boundary_arn,
    record,
)
from cloudtrain.records import SpotPrice, iso, utcnow
from cloudtrain.settings import DEFAULT_REGION, Settings

log = logging.getLogger(__name__)

TAG_RUN_ID = "cloudtrain:run-id"
TAG_OWNER = "cloudtrain:owner"
TAG_EXPIRES = "cloudtrain:expires"
TAG_SSH = "cloudtrain:ssh"  # host:port of a simulated host's SSH server (dry-run only)
DEFAULT_IMAGE_PATTERN = "cloudtrain-gpu-*"
RETRY_CONFIG: Any = {"mode": "standard", "max_attempts": 8}
SIMULATED_CREDENTIALS = ("testing", "testing")  # the simulated AWS's; never the user's keys
S3_POLICY_NAME = "cloudtrain-s3-read"
# The codes a refusal of GetConsoleOutput's Latest may come with (it has no documented one;
# a Xen instance refuses it): UnsupportedOperation, InvalidParameter, InvalidParameterValue...
LATEST_REFUSED = ("UnsupportedOperation", "InvalidParameter")
IAM_ROLE_NAME_MAX = 64  # IAM's limit on a role name (CreateRole's RoleName); moto does not apply it
EC2_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ],
}
PROFILE_RETRY_ATTEMPTS = 6  # run_instances right after creating a profile: about 30 s in all
PROFILE_RETRY_DELAY_S = 2.0
NOT_FOUND_RETRIES = 6  # an instance this process launched, unknown to EC2 yet: about 10 s in all
PLACEMENT_STRATEGY = "cluster"  # a cluster's nodes on one low-latency network segment of one zone
# The codes of a placement group that is not there (Unknown: EC2's word for a name it does not know)
PLACEMENT_GROUP_GONE = ("InvalidPlacementGroup.Unknown", "InvalidPlacementGroup.NotFound")

# The Service Quotas a launch can hit, by instance family letter and market.
QUOTA_NAMES = {
    ("g", True): "All G and VT Spot Instance Requests (L-3819A6DF)",
    ("p", True): "All P Spot Instance Requests (L-7212CCBC)",
    ("g", False): "Running On-Demand G and VT instances (L-DB2E81BA)",
    ("p", False): "Running On-Demand P instances (L-417A185B)",
}


@dataclass(frozen=True)
class CallerIdentity:
    """Who the credentials belong to (STS GetCallerIdentity)."""

    account: str
    arn: str
    user_id: str


@dataclass(frozen=True)
class ServiceQuota:
    """One EC2 quota's value in a region (Service Quotas); ``applied`` False: AWS's default."""

    code: str
    name: str
    value: float
    applied: bool = True


@dataclass(frozen=True)
class TaggedInstance:
    """A cloudtrain instance that is not terminated, found by its run-id tag."""

    id: str
    run_id: str
    owner: str
    state: str


@dataclass(frozen=True)
class TaggedResource:
    """A resource carrying cloudtrain's tags, as ``cloudtrain gc`` sees it.

    ``kind``: instance, volume, security-group, placement-group, key-pair, spot-request or
    instance-profile (an IAM instance profile and its role, one name); ``id``: what deletes
    it (a placement group's, key pair's or profile's name); ``instance_id``: a volume's
    attachment or a spot request's instance."""

    kind: str
    id: str
    tags: Mapping[str, str]
    state: str = ""
    instance_id: str | None = None

    @property
    def run_id(self) -> str:
        return self.tags.get(TAG_RUN_ID, "")

    @property
    def owner(self) -> str:
        return self.tags.get(TAG_OWNER, "")


@dataclass(frozen=True)
class KeyPair:
    name: str
    path: Path


@dataclass(frozen=True)
class Image:
    id: str
    name: str
    root_device_name: str


@dataclass(frozen=True)
class LaunchRequest:
    """Everything ``run_instances`` needs, decided before the call."""

    run_id: str
    instance_type: str
    zone: str | None
    spot: bool
    max_price: float | None
    disk_gb: int
    image: Image
    key: KeyPair
    security_group_id: str
    client_token: str
    tags: Mapping[str, str]
    instance_profile: str | None = None  # an instance profile's name (S3 data sources)
    placement_group: str | None = None  # a cluster placement group's name (launch_cluster)


@dataclass(frozen=True)
class LaunchedInstance:
    """What describe_instances says about a running instance."""

    id: str
    instance_type: str
    zone: str
    lifecycle: str  # "spot" | "on-demand"
    public_ip: str | None
    launched_at: datetime
    state: str
    ssh_host: str | None = None  # where SSH listens: the public IP, or a simulated host
    ssh_port: int = 22
    private_ip: str | None = None  # where the other nodes of a cluster reach it (its VPC address)


def s3_read_policy(buckets: Sequence[str], writable: Sequence[str] = ()) -> dict[str, Any]:
    """Read access to exactly ``buckets`` (list them, get their objects), and read-write
    access (list, get, put, delete) under each ``writable`` ``s3://bucket/prefix/`` URL only."""
    names = sorted(set(buckets))
    statements: list[dict[str, Any]] = []
    if names:
        statements += [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{b}" for b in names],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{b}/*" for b in names],
            },
        ]
    for url in sorted(set(writable)):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        prefix = prefix.rstrip("/") + "/"
        statements += [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}},
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"],
            },
        ]
    return {"Version": "2012-10-17", "Statement": statements}


def s3_buckets(sources: Sequence[str]) -> list[str]:
    """The buckets of ``s3://bucket/prefix`` sources, sorted, once each."""
    return sorted({src[len("s3://") :].split("/", 1)[0] for src in sources if src.startswith("s3://")})


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _is_profile_not_ready(error: ClientError) -> bool:
    message = str(error.response.get("Error", {}).get("Message", ""))
    return _code(error) == "InvalidParameterValue" and "iam instance profile" in message.lower()


def quota_name(instance_type: str, spot: bool) -> str:
    return QUOTA_NAMES.get((instance_type[:1], spot), "the EC2 vCPU quota for this instance family")


def run_tags(run_id: str, owner: str, expires: datetime) -> dict[str, str]:
    return {TAG_RUN_ID: run_id, TAG_OWNER: owner, TAG_EXPIRES: iso(expires), "Name": run_id}


def _newest_image(found: Sequence[Mapping[str, Any]]) -> Image:
    """The newest of described images."""
    newest = max(found, key=lambda i: i.get("CreationDate", ""))
    return Image(newest["ImageId"], newest.get("Name", ""), newest.get("RootDeviceName", "/dev/sda1"))


def _tags(data: Mapping[str, Any]) -> dict[str, str]:
    """A described resource's tags as a dict."""
    return {t["Key"]: t["Value"] for t in data.get("Tags", [])}


def _tag_spec(resource: str, tags: Mapping[str, str]) -> dict[str, Any]:
    return {"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}


def translate(error: Exception, operation: str, *, instance_type: str = "", spot: bool = True) -> Exception:
    """A cloudtrain error, with a hint, for a botocore error."""
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return NoCredentials(
            "no AWS credentials found",
            hint="Run `aws configure`, set AWS_PROFILE or pass --profile; or try --dry-run.",
        )
    if isinstance(error, NoRegionError):
        return InputError("no AWS region set", hint="Set resources.region in the job or AWS_DEFAULT_REGION.")
    if isinstance(error, EndpointConnectionError):
        return CloudError(f"cannot reach AWS for {operation}: {error}", hint="Check the network connection.")
    if not isinstance(error, ClientError):
        return CloudError(f"AWS {operation} failed: {error}")
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "")
    if code in (
        "AuthFailure",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "RequestExpired",
    ):
        return CredentialsError(
            f"AWS refused the credentials ({code}): {message}",
            hint="Refresh the credentials, or choose another --profile.",
        )
    if code == "UnauthorizedOperation":
        return CredentialsError(
            f"not allowed to call {operation}: {message}",
            hint="Grant the IAM permission named above to this user or role "
            "(`cloudtrain iam-policy` prints all that cloudtrain needs).",
        )
    if code == "VcpuLimitExceeded":
        return QuotaError(
            f"the vCPU quota does not allow {instance_type or 'this instance'}: {message}",
            hint=f"Ask for more in Service Quotas: {quota_name(instance_type, spot)}.",
        )
    if code == "MaxSpotInstanceCountExceeded":
        return QuotaError(
            f"too many spot instances already: {message}",
            hint=f"Ask for more in Service Quotas: {quota_name(instance_type, True)}; "
            "or run `cloudtrain status` to find running ones.",
        )
    if code == "InsufficientInstanceCapacity":
        return CapacityError(
            f"AWS has no {instance_type or 'instance'} capacity now: {message}",
            hint="Try another zone or GPU, or try again later.",
        )
    if code == "SpotMaxPriceTooLow":
        return PriceError(
            f"the spot price is above max_price: {message}",
            hint="Raise resources.max_price in the job file.",
        )
    if code in ("RequestLimitExceeded", "Throttling", "ThrottlingException"):
        return CloudError(
            f"AWS kept throttling {operation} after retries: {message}",
            hint="Wait a minute and run again.",
        )
    if code in ("AccessDenied", "AccessDeniedException"):  # IAM's, and the JSON services' word
        return CredentialsError(
            f"not allowed to call {operation}: {message}",
            hint=f"Grant {', '.join(actions_for(operation))} to this user or role "
            "(`cloudtrain iam-policy` prints all that cloudtrain needs).",
        )
    boundary_missing = code in ("NoSuchEntity", "InvalidInput") and BOUNDARY_POLICY_NAME in message
    if operation == "CreateRole" and boundary_missing:  # "Scope ARN: ... does not exist or is not attachable"
        return CredentialsError(
            f"the permissions boundary for the run's role is missing: {message}",
            hint="Create it once: `cloudtrain iam-policy --boundary > boundary.json && aws iam create-policy "
            "--policy-name cloudtrain-instance-boundary --policy-document file://boundary.json`.",
        )
    if code == "LimitExceeded" and operation.startswith(("Create", "Put", "Add")):
        return QuotaError(
            f"an IAM limit stops {operation}: {message}",
            hint="Delete unused cloudtrain-* roles and instance profiles, or ask for a higher IAM quota.",
        )
    if code.startswith("InvalidAMIID"):
        return InputError(
            f"the image cannot be used: {message}",
            hint="Check resources.image, and that it exists in the job's region.",
        )
    return CloudError(f"AWS {operation} failed ({code}): {message}")


@contextmanager
def aws_errors(operation: str, *, instance_type: str = "", spot: bool = True) -> Iterator[None]:
    try:
        yield
    except (ClientError, BotoCoreError) as e:
        raise translate(e, operation, instance_type=instance_type, spot=spot) from e


def make_client(settings: Settings, service: str, region: str, *, max_attempts: int | None = None) -> Any:
    """A boto3 client with standard retries, pointed at the simulator in dry-run.

    ``max_attempts``: fewer tries than the default 8 (``doctor`` reports rather than waits)."""
    retries: Any = RETRY_CONFIG if max_attempts is None else {**RETRY_CONFIG, "max_attempts": max_attempts}
    config = Config(retries=retries, connect_timeout=10, read_timeout=60)
    if settings.simulated:
        # The simulator's own credentials, no profile (AWS_PROFILE may name one this machine
        # lacks), and no proxy: the simulated AWS is on loopback.
        core = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
        session = boto3.Session(
            region_name=region,
            aws_access_key_id=SIMULATED_CREDENTIALS[0],
            aws_secret_access_key=SIMULATED_CREDENTIALS[1],
            botocore_session=core,
        )
        config = config.merge(Config(proxies={}))
    else:
        session = boto3.Session(profile_name=settings.profile, region_name=region)
    client = session.client(service, config=config, endpoint_url=settings.endpoint_url)  # type: ignore[call-overload,unused-ignore]
    if os.environ.get(RECORD_ENV):
        client.meta.events.register("before-call", _record_call)
    return client


def _record_call(model: Any, **_: Any) -> None:
    """Record an operation cloudtrain's own code calls (permissions.record), not one a test
    makes with cloudtrain's client: the first caller outside botocore must be cloudtrain's."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in PASS_THROUGH:
        frame = frame.f_back
    if frame is not None and frame.f_globals.get("__name__", "").startswith("cloudtrain."):
        record(model.service_model.endpoint_prefix, model.name)


def _ingress(group_id: str, cidr: str, *, cluster: bool) -> list[dict[str, Any]]:
    """A run's security group rules: SSH from the controller's /32; for a cluster, all
    traffic from the group's own members too (the group itself as the source, no address)."""
    rules: list[dict[str, Any]] = [
        {
            "IpProtocol": "tcp",
            "FromPort": 22,
            "ToPort": 22,
            "IpRanges": [{"CidrIp": cidr, "Description": "cloudtrain controller"}],
        }
    ]
    if cluster:
        rules.append(
            {
                "IpProtocol": "-1",
                "UserIdGroupPairs": [{"GroupId": group_id, "Description": "cloudtrain cluster members"}],
            }
        )
    return rules


def _private_key_ok(path: Path) -> None:
    """Refuse a key folder or key file that others can read."""
    mode = stat.S_IMODE(path.stat().st_mode)
    wanted = 0o700 if path.is_dir() else 0o600
    if mode & 0o077:
        raise InputError(
            f"{path} has permissions {mode:o}; others could read the private key",
            hint=f"Run: chmod {wanted:o} {path}",
        )


CIDR_HINT = "Set CLOUDTRAIN_SSH_CIDR to your public address, e.g. 203.0.113.7/32."


def single_address(cidr: str, where: str = "the SSH ingress rule") -> str:
    """``cidr`` as one IPv4 address's /32 (a bare address gets its /32). Anything wider
    (a /24, 0.0.0.0/0) or not an IPv4 address is refused: the SSH rule admits the
    controller alone."""
    try:
        network = ipaddress.ip_network(cidr.strip(), strict=True)
    except ValueError as e:
        raise InputError(f"{where}: {cidr!r} is not an IPv4 address", hint=CIDR_HINT) from e
    if network.version != 4 or network.prefixlen != 32:
        raise InputError(
            f"{where} admits {network}: SSH is only ever opened to one IPv4 address (a /32)",
            hint=CIDR_HINT,
        )
    return str(network)


def caller_cidr(settings: Settings) -> str:
    """The /32 of the caller's public address, for the SSH ingress rule."""
    if settings.ssh_cidr:
        return single_address(settings.ssh_cidr, "CLOUDTRAIN_SSH_CIDR")
    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=5) as reply:
            address = reply.read(64).decode("ascii", "replace").strip()
    except OSError as e:
        raise CloudError(f"cannot find this machine's public IP address: {e}", hint=CIDR_HINT) from e
    return single_address(address, "checkip.amazonaws.com's answer")


def _deliver(signum: int, frame: Any, handler: Any) -> None:
    """Act on a signal held back, as its own handler would have."""
    if callable(handler):  # Python's for SIGINT raises KeyboardInterrupt, the CLI's for SIGTERM SystemExit
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)


class Held:
    """What ``signals_held`` yields: whether a signal waits to act when the block ends."""

    def __init__(self) -> None:
        self.signals: list[tuple[int, Any]] = []

    @property
    def pending(self) -> bool:
        return bool(self.signals)


@contextmanager
def signals_held(what: str, if_abandoned: str) -> Iterator[Held]:
    """Hold SIGINT and SIGTERM back while calls whose answers must not be lost are in
    flight (a launch: its answer names the instance teardown must terminate; a create:
    what to delete); the signal acts once the block is over (``pending`` says one
    waits, so the block can undo what the caller would never learn of). A second one
    stops waiting at once, saying what may be left (``if_abandoned``). Main thread only
    (elsewhere signals do not arrive)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in signals}
    state = Held()
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield state  # (None: a handler set outside Python, which could not be put back)
        return
    held = state.signals

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def hold(signum: int, frame: Any) -> None:
        if held:
            held.clear()
            restore()
            log.warning("stopped waiting for %s: %s", what, if_abandoned)
            _deliver(signum, frame, previous[signum])
            return
        held.append((signum, frame))
        log.warning(
            "%s is in flight: waiting for its answer, so that nothing is left behind "
            "(Ctrl-C again to stop waiting)",
            what,
        )

    for sig in signals:
        signal.signal(sig, hold)
    try:
        yield state
    finally:
        restore()
        if held:  # it acts now, even over an error the call raised
            _deliver(held[0][0], held[0][1], previous[held[0][0]])


@contextmanager
def _undone_unless_done(undo: Callable[[], object], what: str, held: Held) -> Iterator[None]:
    """Run ``undo`` (delete what was just made) if the block fails, or if a signal waits:
    either way the caller never gets to record it, so teardown could not find it."""
    try:
        yield
    except BaseException:
        _quietly(undo, what)
        raise
    if held.pending:
        _quietly(undo, what)


def _delete_once_free(
    delete: Callable[[], object],
    what: str,
    operation: str,
    *,
    gone: Sequence[str],
    busy: str,
    attempts: int,
    delay: float,
) -> None:
    """Call ``delete`` until AWS stops answering ``busy`` (a terminated instance still holds
    what is deleted for a few seconds), at most ``attempts`` times ``delay`` apart; an error
    code in ``gone`` (already deleted) is no error."""
    for attempt in range(attempts):
        try:
            delete()
            log.info("deleted %s", what)
            return
        except ClientError as e:
            if _code(e) in gone:
                return
            if _code(e) != busy or attempt == attempts - 1:
                raise translate(e, operation) from e
            time.sleep(delay)
        except BotoCoreError as e:
            raise translate(e, operation) from e


def _quietly(undo: Callable[[], object], what: str) -> None:
    try:
        undo()
        log.info("removed %s again: the run never got to record it", what)
    except (CloudtrainError, ClientError, BotoCoreError, OSError) as e:
        log.warning("could not remove %s (%s): `cloudtrain gc` removes it", what, e)


def launch_params(request: LaunchRequest, count: int = 1) -> dict[str, Any]:
    """RunInstances' parameters for ``count`` hardened instances (MinCount = MaxCount):
    terminate on shutdown, IMDSv2 only, an encrypted gp3 root volume, the run's tags on
    the instances, volumes and spot requests; the zone and placement group when named."""
    params: dict[str, Any] = {
        "ImageId": request.image.id,
        "InstanceType": request.instance_type,
        "MinCount": count,
        "MaxCount": count,
        "KeyName": request.key.name,
        "SecurityGroupIds": [request.security_group_id],
        "ClientToken": request.client_token,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 1,
            "HttpEndpoint": "enabled",
        },
        "BlockDeviceMappings": [
            {
                "DeviceName": request.image.root_device_name,
                "Ebs": {
                    "VolumeSize": request.disk_gb,
                    "VolumeType": "gp3",
                    "Encrypted": True,
                    "DeleteOnTermination": True,
                },
            }
        ],
        "TagSpecifications": [
            _tag_spec("instance", request.tags),
            _tag_spec("volume", request.tags),
        ],
    }
    placement: dict[str, str] = {}
    if request.zone:
        placement["AvailabilityZone"] = request.zone
    if request.placement_group:
        placement["GroupName"] = request.placement_group
    if placement:
        params["Placement"] = placement
    if request.spot:
        options: dict[str, Any] = {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        }
        if request.max_price is not None:
            options["MaxPrice"] = f"{request.max_price:.4f}"
        params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
        # the spot request EC2 makes for it carries the run's tags too (`cloudtrain gc`);
        # only here: an on-demand launch makes no spot request to tag
        params["TagSpecifications"].append(_tag_spec("spot-instances-request", request.tags))
    if request.instance_profile:
        params["IamInstanceProfile"] = {"Name": request.instance_profile}
    return params


class AwsCloud:
    """EC2 in one region, for one settings: every AWS call cloudtrain makes."""

    def __init__(self, settings: Settings, region: str, *, max_attempts: int | None = None) -> None:
        self.settings = settings
        self.region = region
        self.max_attempts = max_attempts
        self.ec2 = make_client(settings, "ec2", region, max_attempts=max_attempts)
        self._iam: Any = None
        self._sts: Any = None
        self._quotas: Any = None
        # run id -> the instances this object launched for it: teardown finds them even
        # before describe_instances lists them (EC2 is eventually consistent)
        self._launched: dict[str, list[str]] = {}
        self._console_latest = True  # console_output: False once an instance refused Latest

    # --- account (doctor) ------------------------------------------------------------------

    @property
    def sts(self) -> Any:
        if self._sts is None:
            self._sts = make_client(self.settings, "sts", self.region, max_attempts=self.max_attempts)
        return self._sts

    @property
    def quotas(self) -> Any:
        """The Service Quotas client."""
        if self._quotas is None:
            self._quotas = make_client(
                self.settings, "service-quotas", self.region, max_attempts=self.max_attempts
            )
        return self._quotas

    def caller_identity(self) -> CallerIdentity:
        with aws_errors("GetCallerIdentity"):
            reply = self.sts.get_caller_identity()
        return CallerIdentity(str(reply["Account"]), str(reply["Arn"]), str(reply.get("UserId", "")))

    def ec2_quota(self, quota_code: str) -> ServiceQuota:
        """An EC2 quota's applied value in this region, else AWS's default value for it."""
        try:
            reply = self.quotas.get_service_quota(ServiceCode="ec2", QuotaCode=quota_code)
            applied = True
        except ClientError as e:
            if _code(e) != "NoSuchResourceException":  # no applied value: ask for the default
                raise translate(e, "GetServiceQuota") from e
            try:
                reply = self.quotas.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=quota_code)
            except (ClientError, BotoCoreError):
                raise translate(e, "GetServiceQuota") from e
            applied = False
        except BotoCoreError as e:
            raise translate(e, "GetServiceQuota") from e
        quota = reply["Quota"]
        return ServiceQuota(
            str(quota.get("QuotaCode", quota_code)),
            str(quota.get("QuotaName", "")),
            float(quota["Value"]),
            applied,
        )

    def tagged_instances(self) -> list[TaggedInstance]:
        """Every instance with a cloudtrain run-id tag that is not terminated."""
        with aws_errors("DescribeInstances"):
            pages = self.ec2.get_paginator("describe_instances").paginate(
                Filters=[
                    {"Name": "tag-key", "Values": [TAG_RUN_ID]},
                    {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
                ]
            )
            found = []
            for page in pages:
                for reservation in page["Reservations"]:
                    for data in reservation["Instances"]:
                        tags = {t["Key"]: t["Value"] for t in data.get("Tags", [])}
                        found.append(
                            TaggedInstance(
                                data["InstanceId"],
                                tags.get(TAG_RUN_ID, ""),
                                tags.get(TAG_OWNER, ""),
                                data["State"]["Name"],
                            )
                        )
        return found

    def key_pair_names(self, prefix: str = "cloudtrain-") -> list[str]:
        """The names of the key pairs starting with ``prefix``, sorted."""
        with aws_errors("DescribeKeyPairs"):
            pairs = self.ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [f"{prefix}*"]}])
        return sorted(p["KeyName"] for p in pairs["KeyPairs"] if p["KeyName"].startswith(prefix))

    # --- prices ------------------------------------------------------------------------

    def spot_prices(
        self,
        instance_types: Sequence[str],
        zones: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> list[SpotPrice]:
        """The current spot price of each type in each zone (the latest observation)."""
        if not instance_types:
            return []
        kwargs: dict[str, Any] = {
            "InstanceTypes": list(instance_types),
            "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            "StartTime": now or utcnow(),
        }
        if zones:
            kwargs["Filters"] = [{"Name": "availability-zone", "Values": list(zones)}]
        prices: list[SpotPrice] = []
        with aws_errors("DescribeSpotPriceHistory"):
            for page in self.ec2.get_paginator("describe_spot_price_history").paginate(**kwargs):
                for item in page["SpotPriceHistory"]:
                    stamp = item["Timestamp"]
                    if stamp.tzinfo is None:
                        stamp = stamp.replace(tzinfo=timezone.utc)
                    prices.append(
                        SpotPrice(
                            item["InstanceType"],
                            item["AvailabilityZone"],
                            float(item["SpotPrice"]),
                            stamp,
                        )
                    )
        return prices

    # --- key pair ------------------------------------------------------------------------

    def ensure_key_pair(self, run_id: str, tags: Mapping[str, str]) -> KeyPair:
        """The run's key pair: private key 0600 in a 0700 folder, reused on relaunch."""
        keys = self.settings.keys_dir
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private_key_ok(keys)
        name = f"cloudtrain-{run_id}"
        path = keys / f"{run_id}.pem"
        with aws_errors("DescribeKeyPairs"):
            found = self.ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
        for pair in found:
            self._refuse_unless_ours(f"key pair {name}", _tags(pair), tags)
        if path.exists() and found:
            _private_key_ok(path)
            return KeyPair(name, path)
        if found:  # the private half is lost: replace the pair
            self.delete_key_pair(name)

        def undo() -> None:
            path.unlink(missing_ok=True)
            self.delete_key_pair(name)

        # a Ctrl-C now would leave a pair the run never records: it waits, and it is undone
        with signals_held(f"the creation of key pair {name}", f"`cloudtrain gc` removes {name}") as held:
            with aws_errors("CreateKeyPair"):
                created = self.ec2.create_key_pair(
                    KeyName=name, KeyType="ed25519", TagSpecifications=[_tag_spec("key-pair", tags)]
                )
            with _undone_unless_done(undo, f"key pair {name}", held):
                path.unlink(missing_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(created["KeyMaterial"])
                log.info("created key pair %s (%s)", name, path)
        return KeyPair(name, path)

    @staticmethod
    def _refuse_unless_ours(what: str, found: Mapping[str, str], tags: Mapping[str, str]) -> None:
        """A resource named after the run that exists already is this run's (a relaunch) only
        when it carries the run's id and owner; anything else is never reused nor replaced."""
        if found.get(TAG_RUN_ID) == tags.get(TAG_RUN_ID) and found.get(TAG_OWNER) == tags.get(TAG_OWNER):
            return
        owner = found.get(TAG_OWNER) or "nobody cloudtrain knows"
        raise CloudError(
            f"{what} already exists and is not this run's (its owner: {owner})",
            hint="Two runs got the same id (same name, same second): start the run again for a new id.",
        )

    def delete_key_pair(self, name: str) -> None:
        with aws_errors("DeleteKeyPair"):
            self.ec2.delete_key_pair(KeyName=name)

    def forget_private_key(self, run_id: str) -> None:
        """Remove the run's private key file (once nothing of the run is left to reach)."""
        (self.settings.keys_dir / f"{run_id}.pem").unlink(missing_ok=True)

    # --- security group ------------------------------------------------------------------

    def create_security_group(
        self, run_id: str, cidr: str, tags: Mapping[str, str], *, cluster: bool = False
    ) -> str:
        """A per-run group allowing tcp/22 from ``cidr`` (one address's /32) only; with
        ``cluster``, also all traffic from the group's own members (a cluster's nodes talk to
        each other on ports TensorFlow chooses), and from nothing else."""
        cidr = single_address(cidr)
        with aws_errors("DescribeVpcs"):
            vpcs = self.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise CloudError(
                f"no default VPC in {self.region}",
                hint="Create one with `aws ec2 create-default-vpc`.",
            )
        name = f"cloudtrain-{run_id}"
        admits = (
            "ssh from the controller, all traffic among its nodes"
            if cluster
            else "ssh from the controller only"
        )
        # a Ctrl-C now would leave a group the run never records: it waits, and it is undone
        with signals_held(
            f"the creation of security group {name}", f"`cloudtrain gc` removes {name}"
        ) as held:
            try:
                group_id: str = self.ec2.create_security_group(
                    GroupName=name,
                    Description=f"cloudtrain run {run_id}: {admits}",
                    VpcId=vpcs[0]["VpcId"],
                    TagSpecifications=[_tag_spec("security-group", tags)],
                )["GroupId"]
            except ClientError as e:
                if _code(e) == "InvalidGroup.Duplicate":  # never reused: a relaunch keeps its id
                    raise CloudError(
                        f"security group {name} already exists and is not this run's",
                        hint="Two runs got the same id (same name, same second): start the run again.",
                    ) from e
                raise translate(e, "CreateSecurityGroup") from e
            except BotoCoreError as e:
                raise translate(e, "CreateSecurityGroup") from e
            undo = lambda: self.delete_security_group(group_id, attempts=1)  # noqa: E731
            with (
                _undone_unless_done(undo, f"security group {group_id}", held),
                aws_errors("AuthorizeSecurityGroupIngress"),
            ):
                self.ec2.authorize_security_group_ingress(
                    GroupId=group_id, IpPermissions=_ingress(group_id, cidr, cluster=cluster)
                )
        log.info(
            "created security group %s for %s (ssh from %s%s)",
            group_id,
            run_id,
            cidr,
            "; all traffic among its members" if cluster else "",
        )
        return group_id

    def delete_security_group(self, group_id: str, attempts: int = 20, delay: float = 3.0) -> None:
        """Delete the group, waiting out the seconds AWS keeps it attached after termination."""
        _delete_once_free(
            lambda: self.ec2.delete_security_group(GroupId=group_id),
            f"security group {group_id}",
            "DeleteSecurityGroup",
            gone=("InvalidGroup.NotFound",),
            busy="DependencyViolation",
            attempts=attempts,
            delay=delay,
        )

    # --- placement group (a cluster's instances, close together in one zone) ----------------

    @staticmethod
    def placement_group_name(run_id: str, launch: int = 0) -> str:
        return f"cloudtrain-{run_id}" + (f"-r{launch}" if launch else "")

    def create_placement_group(self, run_id: str, tags: Mapping[str, str], *, launch: int = 0) -> str:
        """The run's cluster placement group ``cloudtrain-<run-id>`` (``-r<launch>`` for the
        group of its ``launch``-th relaunch: a cluster group lives in one zone, and a relaunch
        may go to another), tagged with ``tags``; returns its name (what RunInstances and
        DeletePlacementGroup take). One the run made before under that name (a retry) is
        reused; another's of the same name is refused."""
        name = self.placement_group_name(run_id, launch)
        # a Ctrl-C now would leave a group the run never records: it waits, and it is undone
        with signals_held(
            f"the creation of placement group {name}", f"`cloudtrain gc` removes {name}"
        ) as held:
            try:
                created = self.ec2.create_placement_group(
                    GroupName=name,
                    Strategy=PLACEMENT_STRATEGY,
                    TagSpecifications=[_tag_spec("placement-group", tags)],
                )
            except ClientError as e:
                if _code(e) != "InvalidPlacementGroup.Duplicate":
                    raise translate(e, "CreatePlacementGroup") from e
                with aws_errors("DescribePlacementGroups"):
                    found = self.ec2.describe_placement_groups(GroupNames=[name])["PlacementGroups"]
                self._refuse_unless_ours(f"placement group {name}", _tags(found[0]) if found else {}, tags)
                log.info("reusing placement group %s for %s", name, run_id)
                return name
            except BotoCoreError as e:
                raise translate(e, "CreatePlacementGroup") from e
            if held.pending:  # the caller will never get to record it
                _quietly(lambda: self.delete_placement_group(name, attempts=1), f"placement group {name}")
        group_id = created.get("PlacementGroup", {}).get("GroupId", "")
        log.info("created placement group %s (%s, %s) for %s", name, group_id, PLACEMENT_STRATEGY, run_id)
        return name

    def delete_placement_group(self, name: str, attempts: int = 20, delay: float = 3.0) -> None:
        """Delete the placement group, waiting out the seconds EC2 still counts a terminated
        instance in it (InvalidPlacementGroup.InUse); one already gone is no error."""
        _delete_once_free(
            lambda: self.ec2.delete_placement_group(GroupName=name),
            f"placement group {name}",
            "DeletePlacementGroup",
            gone=PLACEMENT_GROUP_GONE,
            busy="InvalidPlacementGroup.InUse",
            attempts=attempts,
            delay=delay,
        )

    # --- instance profile (S3 data sources) -----------------------------------------------

    @property
    def iam(self) -> Any:
        if self._iam is None:
            self._iam = make_client(self.settings, "iam", self.region)
        return self._iam

    @staticmethod
    def instance_profile_name(run_id: str) -> str:
        """``cloudtrain-<run-id>``, the run's role and instance profile, within IAM's 64
        characters for a role name: a longer one keeps its start and ends in 8 hex digits
        of a hash of the whole (gc finds them by tag, not by name)."""
        name = f"cloudtrain-{run_id}"
        if len(name) <= IAM_ROLE_NAME_MAX:
            return name
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
        return f"{name[: IAM_ROLE_NAME_MAX - 9]}-{digest}"

    def ensure_instance_profile(
        self, run_id: str, buckets: Sequence[str], tags: Mapping[str, str], writable: Sequence[str] = ()
    ) -> str:
        """The run's instance profile: a role EC2 may assume, allowed to read only ``buckets``
        and to write only under the ``writable`` URLs (the run's checkpoint prefix).

        Created, or reused (its policy rewritten to exactly ``buckets``) on relaunch; the
        instance gets S3 credentials from it, never from the user's keys. Returns its name.
        """
        name = self.instance_profile_name(run_id)
        iam_tags = [{"Key": k, "Value": v} for k, v in tags.items()]
        # a Ctrl-C now would leave a role the run never records: it waits, and what this
        # call made is undone (a profile made before, which an instance may use, is kept)
        with signals_held(
            f"the creation of instance profile {name}", f"`cloudtrain gc` removes {name}"
        ) as held:
            made = False
            try:
                self.iam.create_role(
                    RoleName=name,
                    AssumeRolePolicyDocument=json.dumps(EC2_TRUST_POLICY),
                    Description=f"cloudtrain run {run_id}: read the job's S3 data",
                    # never more than S3 objects, whatever a policy put on it says (permissions.py)
                    PermissionsBoundary=boundary_arn(self.caller_identity().account),
                    Tags=iam_tags,
                )
                made = True
            except ClientError as e:
                if _code(e) != "EntityAlreadyExists":
                    raise translate(e, "CreateRole") from e
                with aws_errors("ListRoleTags"):
                    found = _tags(self.iam.list_role_tags(RoleName=name))
                self._refuse_unless_ours(f"IAM role {name}", found, tags)
            undo = (lambda: self.delete_instance_profile(name)) if made else (lambda: None)
            with _undone_unless_done(undo, f"instance profile {name}", held):
                self._fill_instance_profile(name, iam_tags, buckets, writable)
        log.info("instance profile %s reads s3://%s", name, ", s3://".join(sorted(set(buckets))))
        if writable:
            log.info("instance profile %s writes under %s", name, ", ".join(writable))
        return name

    def _fill_instance_profile(
        self, name: str, iam_tags: list[dict[str, str]], buckets: Sequence[str], writable: Sequence[str]
    ) -> None:
        """The role's policy, and the profile holding the role."""
        with aws_errors("PutRolePolicy"):
            self.iam.put_role_policy(
                RoleName=name,
                PolicyName=S3_POLICY_NAME,
                PolicyDocument=json.dumps(s3_read_policy(buckets, writable)),
            )
        try:
            self.iam.create_instance_profile(InstanceProfileName=name, Tags=iam_tags)
        except ClientError as e:
            if _code(e) != "EntityAlreadyExists":
                raise translate(e, "CreateInstanceProfile") from e
            with aws_errors("GetInstanceProfile"):
                found = _tags(self.iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"])
            self._refuse_unless_ours(
                f"instance profile {name}", found, {t["Key"]: t["Value"] for t in iam_tags}
            )
        with aws_errors("GetInstanceProfile"):
            roles = self.iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
        if not any(r["RoleName"] == name for r in roles):
            with aws_errors("AddRoleToInstanceProfile"):
                self.iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)

    def set_run_expiry(self, run_id: str, when: datetime, instance_profile: str | None = None) -> None:
        """Move the ``cloudtrain:expires`` tag of every resource of the run (``--keep``): `gc`
        judges them by it, so the key pair, the groups and the profile stay as long as the
        instances that need them."""
        found = self.owned_resources(self.settings.owner, run_id)
        by_name = ("key-pair", "placement-group")  # listed by name, tagged by id
        ids = [r.id for r in found if r.kind not in by_name]
        names = [r.id for r in found if r.kind == "key-pair"]
        groups = [r.id for r in found if r.kind == "placement-group"]
        tag = [{"Key": TAG_EXPIRES, "Value": iso(when)}]
        if names:
            with aws_errors("DescribeKeyPairs"):
                ids += [k["KeyPairId"] for k in self.ec2.describe_key_pairs(KeyNames=names)["KeyPairs"]]
        if groups:
            with aws_errors("DescribePlacementGroups"):
                described = self.ec2.describe_placement_groups(GroupNames=groups)["PlacementGroups"]
            ids += [g["GroupId"] for g in described if g.get("GroupId")]
        if ids:
            with aws_errors("CreateTags"):
                self.ec2.create_tags(Resources=ids, Tags=tag)
        if instance_profile:
            with aws_errors("TagRole"):
                self.iam.tag_role(RoleName=instance_profile, Tags=tag)
            with aws_errors("TagInstanceProfile"):
                self.iam.tag_instance_profile(InstanceProfileName=instance_profile, Tags=tag)

    def check_bucket(self, bucket: str, where: str) -> None:
        """Refuse, before launching, a bucket that is not there or that these credentials
        cannot reach (``where`` names the job file and key)."""
        s3 = make_client(self.settings, "s3", self.region)
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchBucket"):
                raise InputError(
                    f"{where}: there is no bucket {bucket}",
                    hint=f"Create it (aws s3 mb s3://{bucket}) or name another.",
                ) from e
            if _code(e) in ("403", "AccessDenied"):
                raise CloudError(
                    f"{where}: access to bucket {bucket} is denied", hint="Check the bucket's policy."
                ) from e
            raise translate(e, "HeadBucket") from e
        except BotoCoreError as e:
            raise translate(e, "HeadBucket") from e

    def delete_instance_profile(self, name: str) -> None:
        """Remove the role from the profile, delete the profile, the role's policies, the role."""
        steps: list[tuple[str, Any]] = [
            (
                "RemoveRoleFromInstanceProfile",
                lambda: self.iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=name),
            ),
            ("DeleteInstanceProfile", lambda: self.iam.delete_instance_profile(InstanceProfileName=name)),
            (
                "DeleteRolePolicy",
                lambda: self.iam.delete_role_policy(RoleName=name, PolicyName=S3_POLICY_NAME),
            ),
            ("DeleteRole", lambda: self.iam.delete_role(RoleName=name)),
        ]
        for operation, call in steps:
            try:
                call()
            except ClientError as e:
                if _code(e) != "NoSuchEntity":
                    raise translate(e, operation) from e
        log.info("deleted instance profile %s", name)

    # --- image ---------------------------------------------------------------------------

    def resolve_image(self, image: str | None) -> Image:
        """An AMI id, or the newest image of that name (default: the cloudtrain image)."""
        with aws_errors("DescribeImages"):
            if image and image.startswith("ami-"):
                found = self.ec2.describe_images(ImageIds=[image])["Images"]
            else:
                pattern = image or DEFAULT_IMAGE_PATTERN
                found = self.ec2.describe_images(
                    Owners=["self"], Filters=[{"Name": "name", "Values": [pattern]}]
                )["Images"]
                if not found and image:
                    found = self.ec2.describe_images(Filters=[{"Name": "name", "Values": [pattern]}])[
                        "Images"
                    ]
        if not found:
            wanted = image or f"the cloudtrain image ({DEFAULT_IMAGE_PATTERN})"
            raise InputError(
                f"no image {wanted} in {self.region}",
                hint="Set resources.image to an AMI id or name that exists in this region.",
            )
        return _newest_image(found)

    # --- instances -----------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> str:
        """run_instances: one hardened instance; the same ClientToken on every retry."""
        return self._launch(request, 1)[0]

    def launch_cluster(self, request: LaunchRequest, count: int) -> list[str]:
        """run_instances: ``count`` hardened instances in one call, MinCount = MaxCount (EC2
        launches all of them or none), in ``request.placement_group`` when it names one;
        their ids in launch order (AmiLaunchIndex: the first is the chief). Fewer than
        ``count`` (EC2 should never) are terminated again, and that is a CapacityError."""
        if count < 1:
            raise ValueError(f"a cluster has at least one instance, not {count}")
        ids = self._launch(request, count)
        if len(ids) < count:
            for instance_id in ids:
                try:
                    self.terminate(instance_id)
                except CloudtrainError as e:  # teardown finds it by the run's tag
                    log.warning("could not terminate %s of an incomplete cluster: %s", instance_id, e.message)
            raise CapacityError(
                f"AWS launched {len(ids)} of the {count} {request.instance_type} instances asked for "
                "(terminated again)",
                hint="Try another zone or GPU, fewer nodes, or try again later.",
            )
        return ids

    def _launch(self, request: LaunchRequest, count: int) -> list[str]:
        """One RunInstances for ``count`` instances; their ids, by AmiLaunchIndex."""
        params = launch_params(request, count)
        what, them = (f"{count} instances", "them") if count > 1 else ("an instance", "it")
        # A Ctrl-C now would lose the answer that names the instances: it waits for it.
        with signals_held(
            f"the launch of {request.run_id}'s {what.removeprefix('an ')}",
            f"it may have started {what} (client token {request.client_token}); "
            f"`cloudtrain down {request.run_id}` or `cloudtrain gc` terminates {them}",
        ):
            log.info(
                "RunInstances for %s: %d x %s%s (client token %s)",
                request.run_id,
                count,
                request.instance_type,
                f" in placement group {request.placement_group}" if request.placement_group else "",
                request.client_token,
            )
            with aws_errors("RunInstances", instance_type=request.instance_type, spot=request.spot):
                reply = self._run_instances(params)
            launched = sorted(reply["Instances"], key=lambda i: int(i.get("AmiLaunchIndex", 0)))
            ids: list[str] = [i["InstanceId"] for i in launched]
            known = self._launched.setdefault(request.run_id, [])
            known.extend(i for i in ids if i not in known)  # a retried token answers the same ids
        log.info(
            "launched %s (%s, %s) for %s",
            ", ".join(ids),
            request.instance_type,
            "spot" if request.spot else "on-demand",
            request.run_id,
        )
        return ids

    def _run_instances(self, params: dict[str, Any]) -> Any:
        """run_instances, waiting out IAM's eventual consistency: a new instance profile can be
        "invalid" to EC2 for a few seconds (the same ClientToken makes the retry safe)."""
        delay = PROFILE_RETRY_DELAY_S
        for attempt in range(PROFILE_RETRY_ATTEMPTS):
            try:
                return self.ec2.run_instances(**params)
            except ClientError as e:
                if not (
                    "IamInstanceProfile" in params
                    and _is_profile_not_ready(e)
                    and attempt < PROFILE_RETRY_ATTEMPTS - 1
                ):
                    raise
                log.info("the instance profile is not visible to EC2 yet; retrying in %.0f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def describe(self, instance_id: str) -> LaunchedInstance:
        with aws_errors("DescribeInstances"):
            reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        data = reservations[0]["Instances"][0]
        tags = {t["Key"]: t["Value"] for t in data.get("Tags", [])}
        ssh_host, ssh_port = data.get("PublicIpAddress"), 22
        if TAG_SSH in tags:  # the simulator's loopback endpoint: an endpoint swap, not a code path
            host, _, port = tags[TAG_SSH].rpartition(":")
            ssh_host, ssh_port = host, int(port)
        return LaunchedInstance(
            id=data["InstanceId"],
            instance_type=data["InstanceType"],
            zone=data["Placement"]["AvailabilityZone"],
            lifecycle="spot" if data.get("InstanceLifecycle") == "spot" else "on-demand",
            public_ip=data.get("PublicIpAddress"),
            launched_at=data["LaunchTime"].astimezone(timezone.utc),
            state=data["State"]["Name"],
            ssh_host=ssh_host,
            ssh_port=ssh_port,
            private_ip=data.get("PrivateIpAddress"),
        )

    def console_output(self, instance_id: str) -> str:
        """The instance's console log (cloud-init prints the SSH host key fingerprints there).

        ``Latest`` (the log as it is now, not the buffered copy EC2 posts after a state
        change) exists only on Nitro instances; an instance that refuses it (p3 is Xen)
        is asked again without it, and so are later calls of this object."""
        reply = None
        if self._console_latest:
            try:
                reply = self.ec2.get_console_output(InstanceId=instance_id, Latest=True)
            except ClientError as e:
                if not _code(e).startswith(LATEST_REFUSED):
                    raise translate(e, "GetConsoleOutput") from e
                log.info("%s refuses Latest console output (%s); asking without it", instance_id, _code(e))
                self._console_latest = False
            except BotoCoreError as e:
                raise translate(e, "GetConsoleOutput") from e
        if reply is None:
            with aws_errors("GetConsoleOutput"):
                reply = self.ec2.get_console_output(InstanceId=instance_id)
        text = reply.get("Output") or ""
        try:  # EC2 returns it base64-encoded
            decoded = base64.b64decode(text, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return str(text)
        return decoded

    def _wait(
        self, waiter: str, instance_id: str, delay: int, max_attempts: int, failure: str, hint: str
    ) -> None:
        """A botocore waiter on one instance; its timeout becomes ``failure`` with ``hint``."""
        try:
            self.ec2.get_waiter(waiter).wait(
                InstanceIds=[instance_id],
                WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts},
            )
        except WaiterError as e:
            raise CloudError(f"{instance_id} {failure}: {e}", hint=hint) from e
        except BotoCoreError as e:
            raise translate(e, "DescribeInstances") from e

    def wait_running(self, instance_id: str, delay: int = 5, max_attempts: int = 120) -> LaunchedInstance:
        self._wait(
            "instance_running",
            instance_id,
            delay,
            max_attempts,
            "did not reach running",
            "See the EC2 console for the instance's state reason.",
        )
        return self.describe(instance_id)

    def find_run_instances(self, run_id: str, *, any_owner: bool = False) -> list[LaunchedInstance]:
        """The run's instances that are not terminated, found by its id and this owner's tags,
        and those this object launched for it (which a filter may not list yet).

        ``any_owner``: whoever's tags (or none) claim the run id: for checks that only keep a
        run from counting as ended (`gc`), never to terminate what is found."""
        live = ["pending", "running", "stopping", "stopped"]
        owner = [] if any_owner else [{"Name": f"tag:{TAG_OWNER}", "Values": [self.settings.owner]}]
        with aws_errors("DescribeInstances"):
            pages = self.ec2.get_paginator("describe_instances").paginate(
                Filters=[
                    {"Name": f"tag:{TAG_RUN_ID}", "Values": [run_id]},
                    *owner,
                    {"Name": "instance-state-name", "Values": live},
                ]
            )
            ids = [
                i["InstanceId"]
                for page in pages
                for r in page["Reservations"]
                for i in r["Instances"]
                if any_owner or _tags(i).get(TAG_OWNER) == self.settings.owner  # whatever a filter does
            ]
        found = [self.describe(i) for i in ids]
        for launched in self._launched.get(run_id, []):
            if launched in ids:
                continue
            try:
                instance = self.describe(launched)
            except CloudtrainError as e:
                log.warning("%s, launched for %s, cannot be described: %s", launched, run_id, e.message)
                continue
            if instance.state in live:
                found.append(instance)
        return found

    def ask_to_terminate(self, instance_ids: Sequence[str]) -> None:
        """TerminateInstances for each, without waiting: several nodes then shut down
        together, and ``terminate`` confirms each in turn. What fails here is left to it."""
        for instance_id in instance_ids:
            try:
                self.ec2.terminate_instances(InstanceIds=[instance_id])
            except (ClientError, BotoCoreError) as e:
                log.info("asking %s to terminate: %s", instance_id, e)

    def terminate(
        self, instance_id: str, delay: int = 5, max_attempts: int = 120, not_found_delay: float = 2.0
    ) -> datetime:
        """Terminate and confirm with describe_instances; return when it was confirmed.

        An id EC2 does not know is taken as long gone, unless this object launched it:
        a new instance's id can be unknown for a few seconds (a Ctrl-C right after the
        launch), so that is asked again first."""
        fresh = any(instance_id in ids for ids in self._launched.values())
        tries = NOT_FOUND_RETRIES if fresh else 1
        for attempt in range(1, tries + 1):
            try:
                self.ec2.terminate_instances(InstanceIds=[instance_id])
                break
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                    raise translate(e, "TerminateInstances") from e
                if attempt == tries:
                    return utcnow()
                log.info("%s, just launched, is not known to EC2 yet; asking again", instance_id)
                time.sleep(not_found_delay)
            except BotoCoreError as e:
                raise translate(e, "TerminateInstances") from e
        self._wait(
            "instance_terminated",
            instance_id,
            delay,
            max_attempts,
            "was asked to terminate but is not confirmed terminated",
            f"Check it with `aws ec2 describe-instances --instance-ids {instance_id}`.",
        )
        state = self.describe(instance_id).state
        if state != "terminated":
            raise CloudError(
                f"{instance_id} is {state}, not terminated",
                hint=f"Terminate it by hand: aws ec2 terminate-instances --instance-ids {instance_id}",
            )
        log.info("terminated %s", instance_id)
        return utcnow()

    # --- garbage collection (cloudtrain gc): what runs left behind, by owner tag ------------

    def owned_resources(self, owner: str, run_id: str | None = None) -> list[TaggedResource]:
        """This region's resources tagged with ``owner`` and a run id (``run_id``: that
        run's only: a run id alone is no filter, two owners' runs may share one): instances
        not yet terminated, volumes, security groups, placement groups, key pairs, open or
        active spot requests.

        AWS filters by the tags; they are checked again here, so another owner's (or
        run's) resource never comes back whatever a filter does."""
        owned = [{"Name": f"tag:{TAG_OWNER}", "Values": [owner]}]
        if run_id is not None:
            owned.append({"Name": f"tag:{TAG_RUN_ID}", "Values": [run_id]})
        found: list[TaggedResource] = []
        with aws_errors("DescribeInstances"):
            states = ["pending", "running", "shutting-down", "stopping", "stopped"]
            for page in self.ec2.get_paginator("describe_instances").paginate(
                Filters=[*owned, {"Name": "instance-state-name", "Values": states}]
            ):
                for reservation in page["Reservations"]:
                    for data in reservation["Instances"]:
                        found.append(
                            TaggedResource("instance", data["InstanceId"], _tags(data), data["State"]["Name"])
                        )
        with aws_errors("DescribeSpotInstanceRequests"):
            for page in self.ec2.get_paginator("describe_spot_instance_requests").paginate(
                Filters=[*owned, {"Name": "state", "Values": ["open", "active"]}]
            ):
                for data in page["SpotInstanceRequests"]:
                    found.append(
                        TaggedResource(
                            "spot-request",
                            data["SpotInstanceRequestId"],
                            _tags(data),
                            data["State"],
                            data.get("InstanceId"),
                        )
                    )
        with aws_errors("DescribeVolumes"):
            for page in self.ec2.get_paginator("describe_volumes").paginate(Filters=owned):
                for data in page["Volumes"]:
                    if data["State"] in ("deleting", "deleted"):
                        continue
                    attached = [a["InstanceId"] for a in data.get("Attachments", []) if a.get("InstanceId")]
                    found.append(
                        TaggedResource(
                            "volume",
                            data["VolumeId"],
                            _tags(data),
                            data["State"],
                            attached[0] if attached else None,
                        )
                    )
        with aws_errors("DescribeSecurityGroups"):
            for page in self.ec2.get_paginator("describe_security_groups").paginate(Filters=owned):
                for data in page["SecurityGroups"]:
                    found.append(TaggedResource("security-group", data["GroupId"], _tags(data)))
        with aws_errors("DescribePlacementGroups"):  # not paginated
            for data in self.ec2.describe_placement_groups(Filters=owned)["PlacementGroups"]:
                if data.get("State") in ("deleting", "deleted"):
                    continue
                found.append(
                    TaggedResource("placement-group", data["GroupName"], _tags(data), data.get("State", ""))
                )
        with aws_errors("DescribeKeyPairs"):
            for data in self.ec2.describe_key_pairs(Filters=owned)["KeyPairs"]:
                found.append(TaggedResource("key-pair", data["KeyName"], _tags(data)))
        return [r for r in found if r.owner == owner and r.run_id and run_id in (None, r.run_id)]

    def owned_instance_profiles(self, owner: str, prefix: str = "cloudtrain-") -> list[TaggedResource]:
        """IAM (global, whatever this cloud's region): the ``prefix``* roles and instance
        profiles tagged with ``owner`` and a run id, one per name (a run's profile and its
        role share the name, and ``delete_instance_profile`` removes both).

        A role's tags come from ListRoleTags; a profile left without its role is judged
        by the tags GetInstanceProfile returns (none: not this owner's)."""
        tags: dict[str, Mapping[str, str]] = {}
        with aws_errors("ListRoles"):
            for page in self.iam.get_paginator("list_roles").paginate():
                for role in page["Roles"]:
                    name = role["RoleName"]
                    if not name.startswith(prefix):
                        continue
                    try:
                        reply = self.iam.list_role_tags(RoleName=name)
                    except ClientError as e:
                        if _code(e) == "NoSuchEntity":  # deleted meanwhile
                            continue
                        raise translate(e, "ListRoleTags") from e
                    tags[name] = _tags(reply)
        with aws_errors("ListInstanceProfiles"):
            for page in self.iam.get_paginator("list_instance_profiles").paginate():
                for profile in page["InstanceProfiles"]:
                    name = profile["InstanceProfileName"]
                    if not name.startswith(prefix) or name in tags:
                        continue
                    if "Tags" not in profile:  # ListInstanceProfiles leaves them out on AWS
                        try:
                            profile = self.iam.get_instance_profile(InstanceProfileName=name)[
                                "InstanceProfile"
                            ]
                        except ClientError as e:
                            if _code(e) == "NoSuchEntity":
                                continue
                            raise translate(e, "GetInstanceProfile") from e
                    tags[name] = _tags(profile)
        found = [TaggedResource("instance-profile", name, t) for name, t in sorted(tags.items())]
        return [r for r in found if r.owner == owner and r.run_id]

    def delete_volume(self, volume_id: str, attempts: int = 20, delay: float = 3.0) -> None:
        """Delete the volume, waiting out the seconds it stays in use after its instance
        terminated; one already gone (DeleteOnTermination) is no error."""
        _delete_once_free(
            lambda: self.ec2.delete_volume(VolumeId=volume_id),
            f"volume {volume_id}",
            "DeleteVolume",
            gone=("InvalidVolume.NotFound",),
            busy="VolumeInUse",
            attempts=attempts,
            delay=delay,
        )

    def cancel_spot_request(self, request_id: str) -> None:
        """Cancel a spot instance request (its instance, if any, is not terminated by this)."""
        try:
            self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[request_id])
        except ClientError as e:
            if _code(e) != "InvalidSpotInstanceRequestID.NotFound":
                raise translate(e, "CancelSpotInstanceRequests") from e
        except BotoCoreError as e:
            raise translate(e, "CancelSpotInstanceRequests") from e
        log.info("cancelled spot request %s", request_id)

    # --- images (cloudtrain image build | list | copy | rm; the run's image choice) --------
    # Kept together at the end of the class: every AWS call `cloudtrain image` makes.

    def base_image(self, base: str | None = None) -> Image:
        """What a builder starts from: an AMI id, the newest image of a name (any owner), or by
        default the newest AWS Deep Learning Base GPU image (Ubuntu LTS, NVIDIA driver), found
        by name and owner, never by a fixed id."""
        with aws_errors("DescribeImages"):
            if base and base.startswith("ami-"):
                found = self.ec2.describe_images(ImageIds=[base])["Images"]
            elif base:
                found = self.ec2.describe_images(Filters=[{"Name": "name", "Values": [base]}])["Images"]
            else:
                found = self._public_images(BASE_IMAGE_OWNER, BASE_IMAGE_PATTERN)
        if not found:
            wanted = base or f"the base image ({BASE_IMAGE_PATTERN}, owner {BASE_IMAGE_OWNER})"
            raise InputError(
                f"no image {wanted} in {self.region}",
                hint="Pass --base with an AMI id or name that exists in this region.",
            )
        return _newest_image(found)

    def _public_images(self, owner: str, pattern: str) -> list[dict[str, Any]]:
        """The available x86_64 images of ``owner`` named like ``pattern`` (a publisher's
        images, found by name and owner, never by a fixed id)."""
        found: list[dict[str, Any]] = self.ec2.describe_images(
            Owners=[owner],
            Filters=[
                {"Name": "name", "Values": [pattern]},
                {"Name": "architecture", "Values": ["x86_64"]},
                {"Name": "state", "Values": ["available"]},
            ],
        )["Images"]
        return found

    def ubuntu_image(self) -> Image:
        """Canonical's newest Ubuntu 22.04 LTS x86_64 image, by name and owner (``doctor
        --launch``: a plain image, with the ``python3`` the agent must run on)."""
        with aws_errors("DescribeImages"):
            found = self._public_images(UBUNTU_OWNER, UBUNTU_PATTERN)
        if not found:
            raise CloudError(
                f"no Ubuntu 22.04 image ({UBUNTU_PATTERN}, owner {UBUNTU_OWNER}) in {self.region}",
                hint="Try another --region.",
            )
        return _newest_image(found)

    def cloudtrain_images(self) -> list[ImageInfo]:
        """This account's cloudtrain images (cloudtrain-gpu-*) in the region, newest first."""
        with aws_errors("DescribeImages"):
            found = self.ec2.describe_images(
                Owners=["self"], Filters=[{"Name": "name", "Values": [DEFAULT_IMAGE_PATTERN]}]
            )["Images"]
        images = [_image_info(data, self.region) for data in found]
        return sorted(images, key=lambda i: i.created_at, reverse=True)

    def choose_image(self, version: str) -> ImageChoice:
        """The default image of a run: the newest cloudtrain image of ``version`` (the installed
        recipe's); else the newest of any version (``current`` False: say so); none: InputError."""
        images = [i for i in self.cloudtrain_images() if i.state == "available"]
        if not images:
            raise InputError(
                f"no cloudtrain image ({DEFAULT_IMAGE_PATTERN}) in {self.region}",
                hint=f"Build one with `cloudtrain image build --region {self.region}` (once per region), "
                "or set resources.image to an AMI id or name.",
            )
        matching = [i for i in images if i.version == version]
        chosen = (matching or images)[0]
        return ImageChoice(chosen.image, chosen.version, current=bool(matching))

    def image_info(self, image: str) -> ImageInfo:
        """One of this account's images in the region, by AMI id or name."""
        key = "ImageIds" if image.startswith("ami-") else "Filters"
        value: Any = [image] if key == "ImageIds" else [{"Name": "name", "Values": [image]}]
        try:
            found = self.ec2.describe_images(Owners=["self"], **{key: value})["Images"]
        except ClientError as e:
            if _code(e) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Malformed"):
                raise translate(e, "DescribeImages") from e
            found = []
        except BotoCoreError as e:
            raise translate(e, "DescribeImages") from e
        if not found:
            raise InputError(
                f"no image {image} of this account in {self.region}",
                hint="`cloudtrain image list --region R` shows them.",
            )
        return _image_info(found[0], self.region)

    def create_image(self, instance_id: str, name: str, description: str, tags: Mapping[str, str]) -> str:
        """create_image from the (builder) instance; the image and its snapshots get ``tags``."""
        with aws_errors("CreateImage"):
            image_id: str = self.ec2.create_image(InstanceId=instance_id, Name=name, Description=description)[
                "ImageId"
            ]
            self.ec2.create_tags(Resources=[image_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        log.info("creating image %s (%s) from %s", image_id, name, instance_id)
        snapshots = self.image_info(image_id).snapshot_ids
        if snapshots:
            with aws_errors("CreateTags"):
                self.ec2.create_tags(
                    Resources=list(snapshots), Tags=[{"Key": k, "Value": v} for k, v in tags.items()]
                )
        return image_id

    def wait_image_available(self, image_id: str, delay: int = 15, max_attempts: int = 240) -> None:
        """Until the image is available (creating one takes minutes; the default waits an hour)."""
        try:
            self.ec2.get_waiter("image_available").wait(
                ImageIds=[image_id], WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts}
            )
        except WaiterError as e:
            raise CloudError(
                f"image {image_id} did not become available: {e}",
                hint="See the image's state in the EC2 console (AMIs); `cloudtrain image rm` removes it.",
            ) from e
        except BotoCoreError as e:
            raise translate(e, "DescribeImages") from e

    def copy_image(self, source: ImageInfo, tags: Mapping[str, str]) -> str:
        """copy_image into this region (from ``source``'s), with ``source``'s name and tags."""
        with aws_errors("CopyImage"):
            image_id: str = self.ec2.copy_image(
                SourceImageId=source.id,
                SourceRegion=source.region,
                Name=source.name,
                Description=f"cloudtrain image {source.version}, copied from {source.id} in {source.region}",
            )["ImageId"]
            self.ec2.create_tags(Resources=[image_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        log.info("copying image %s (%s) to %s as %s", source.id, source.region, self.region, image_id)
        return image_id

    def delete_image(self, image: ImageInfo) -> None:
        """Deregister the image, then delete its snapshots (they bill on their own)."""
        with aws_errors("DeregisterImage"):
            self.ec2.deregister_image(ImageId=image.id)
        for snapshot in image.snapshot_ids:
            try:
                self.ec2.delete_snapshot(SnapshotId=snapshot)
            except ClientError as e:
                if _code(e) != "InvalidSnapshot.NotFound":
                    raise translate(e, "DeleteSnapshot") from e
            except BotoCoreError as e:
                raise translate(e, "DeleteSnapshot") from e
        log.info("deleted image %s and its snapshots %s", image.id, ", ".join(image.snapshot_ids) or "(none)")


def credentials_source(settings: Settings) -> str | None:
    """Where boto3 finds credentials ("env", "shared-credentials-file", "sso", ...), or None.

    Local only: no AWS call (an assume-role or SSO profile is resolved at the first call)."""
    if settings.simulated:
        return "simulated"
    try:
        credentials = boto3.Session(profile_name=settings.profile).get_credentials()
    except BotoCoreError as e:  # ProfileNotFound, a broken config file
        raise InputError(
            f"AWS profile problem: {e}", hint="Check --profile / AWS_PROFILE against ~/.aws/config."
        ) from e
    return None if credentials is None else str(getattr(credentials, "method", None) or "unknown")


def default_region(settings: Settings) -> str:
    """The region of a command or job that names none, in the AWS CLI's order: AWS_REGION or
    AWS_DEFAULT_REGION, else the profile's, else us-east-1. The only such resolver."""
    if settings.region:
        return settings.region
    if settings.simulated:
        return DEFAULT_REGION
    return profile_region(settings) or DEFAULT_REGION


def profile_region(settings: Settings) -> str | None:
    """The region the AWS profile (or environment) names, if any."""
    if settings.simulated:
        return settings.region
    try:
        return boto3.Session(profile_name=settings.profile).region_name or settings.region
    except BotoCoreError as e:  # ProfileNotFound and friends
        raise InputError(
            f"AWS profile problem: {e}", hint="Check --profile / AWS_PROFILE against ~/.aws/config."
        ) from e


# --- images: what `cloudtrain image` and the run's image choice use ----------------------------

TAG_IMAGE_VERSION = "cloudtrain:image-version"  # the recipe's hash (simimage.recipe_version)
# what the build verified in each job environment: "tensorflow: Keras 3.12.4, tensorflow 2.21.0; ..."
TAG_FRAMEWORKS = "cloudtrain:frameworks"
IMAGE_NAME_PREFIX = "cloudtrain-gpu-"  # matches DEFAULT_IMAGE_PATTERN
# The default base of a build: AWS's Deep Learning Base GPU image for Ubuntu 22.04 LTS (the
# NVIDIA driver and CUDA-ready kernel; the recipe installs the rest), owner "amazon"'s DLAMI account.
BASE_IMAGE_OWNER = "898082745236"
BASE_IMAGE_PATTERN = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
# Canonical's Ubuntu 22.04 LTS images (hvm-ssd, and hvm-ssd-gp3 for the newer ones).
UBUNTU_OWNER = "099720109477"
UBUNTU_PATTERN = "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*"


@dataclass(frozen=True)
class ImageInfo:
    """One cloudtrain image as describe_images shows it."""

    id: str
    name: str
    region: str
    version: str  # its cloudtrain:image-version tag ("" when it has none)
    state: str
    created_at: str
    root_device_name: str
    snapshot_ids: tuple[str, ...]
    tags: Mapping[str, str]

    @property
    def image(self) -> Image:
        return Image(self.id, self.name, self.root_device_name)

    @property
    def frameworks(self) -> str:
        """What its build verified in each job environment ("" for an image without the tag)."""
        return self.tags.get(TAG_FRAMEWORKS, "")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "region": self.region,
            "version": self.version or None,
            "frameworks": self.frameworks or None,
            "state": self.state,
            "created_at": self.created_at,
            "snapshots": list(self.snapshot_ids),
        }


@dataclass(frozen=True)
class ImageChoice:
    """A run's default image: ``current`` when its version is the installed recipe's."""

    image: Image
    version: str
    current: bool


def _image_info(data: Mapping[str, Any], region: str) -> ImageInfo:
    tags = _tags(data)
    snapshots = tuple(
        m["Ebs"]["SnapshotId"]
        for m in data.get("BlockDeviceMappings", [])
        if m.get("Ebs", {}).get("SnapshotId")
    )
    created = data.get("CreationDate", "")
    return ImageInfo(
        id=data["ImageId"],
        name=data.get("Name", ""),
        region=region,
        version=tags.get(TAG_IMAGE_VERSION, ""),
        state=data.get("State", ""),
        created_at=created if isinstance(created, str) else iso(created),
        root_device_name=data.get("RootDeviceName", "/dev/sda1"),
        snapshot_ids=snapshots,
        tags=tags,
    )
