"""The AWS provider against moto: what run_instances really records, retries, errors, teardown."""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from moto import mock_aws

from cloudtrain.cloud.aws import (
    TAG_EXPIRES,
    TAG_OWNER,
    TAG_RUN_ID,
    AwsCloud,
    KeyPair,
    LaunchRequest,
    default_region,
    run_tags,
)
from cloudtrain.cloud.simulator import simulated_aws
from cloudtrain.errors import (
    CapacityError,
    CloudError,
    CredentialsError,
    InputError,
    PriceError,
    QuotaError,
)
from cloudtrain.prices import estimated_spot
from cloudtrain.records import utcnow
from cloudtrain.settings import Settings

RUN_ID = "digits-mlp-20261128-120000-abcd"


@pytest.fixture
def cloud(settings: Settings) -> Iterator[AwsCloud]:
    """EC2 on a moto server: injected faults short-circuit the HTTP send, as with real AWS
    (in-process ``mock_aws`` would still carry out a request whose response we replace)."""
    with simulated_aws(settings) as sim:
        yield AwsCloud(sim.with_(ssh_cidr="203.0.113.7/32"), "us-east-1")


@pytest.fixture
def tags() -> dict[str, str]:
    return run_tags(RUN_ID, "tester@testhost", utcnow() + timedelta(hours=5))


@pytest.fixture
def image_id(cloud: AwsCloud) -> str:
    image: str = cloud.ec2.register_image(Name="cloudtrain-gpu-20261128")["ImageId"]
    return image


def launch_request(cloud: AwsCloud, tags: dict[str, str], image_id: str, **changes: Any) -> LaunchRequest:
    key = cloud.ensure_key_pair(RUN_ID, tags)
    group = cloud.create_security_group(RUN_ID, "203.0.113.7/32", tags)
    fields: dict[str, Any] = dict(
        run_id=RUN_ID,
        instance_type="g4dn.xlarge",
        zone="us-east-1b",
        spot=True,
        max_price=0.4,
        disk_gb=120,
        image=cloud.resolve_image(None),
        key=key,
        security_group_id=group,
        client_token=f"{RUN_ID}-1",
        tags=tags,
    )
    fields.update(changes)
    return LaunchRequest(**fields)


def tag_dict(items: list[dict[str, str]]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items}


def test_launch_parameters_as_moto_records_them(cloud: AwsCloud, tags: dict[str, str], image_id: str) -> None:
    request = launch_request(cloud, tags, image_id)
    assert request.image.id == image_id  # the default cloudtrain image, found by name
    sent: list[dict[str, Any]] = []  # what moto accepts but does not record: the request itself
    cloud.ec2.meta.events.register(
        "provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(copy.deepcopy(params))
    )
    instance_id = cloud.launch(request)
    assert sent[0]["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
            "MaxPrice": "0.4000",
        },
    }
    assert sent[0]["BlockDeviceMappings"][0]["Ebs"]["VolumeType"] == "gp3"
    assert sent[0]["ClientToken"] == f"{RUN_ID}-1"
    running = cloud.wait_running(instance_id, delay=1)
    assert running.state == "running" and running.lifecycle == "spot"
    assert running.zone == "us-east-1b" and running.instance_type == "g4dn.xlarge"

    data = cloud.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert data["InstanceLifecycle"] == "spot"
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert tag_dict(data["Tags"]) == tags
    assert set(tags) == {TAG_RUN_ID, TAG_OWNER, TAG_EXPIRES, "Name"}
    behaviour = cloud.ec2.describe_instance_attribute(
        InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    volumes = cloud.ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
    )["Volumes"]
    assert len(volumes) == 1, "the root volume must be mapped by the image's root device name"
    assert volumes[0]["Encrypted"] is True and volumes[0]["Size"] == 120
    assert tag_dict(volumes[0]["Tags"])[TAG_RUN_ID] == RUN_ID

    group = cloud.ec2.describe_security_groups(GroupIds=[request.security_group_id])["SecurityGroups"][0]
    assert tag_dict(group["Tags"])[TAG_RUN_ID] == RUN_ID
    assert [
        (p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]])
        for p in group["IpPermissions"]
    ] == [("tcp", 22, 22, ["203.0.113.7/32"])]

    pair = cloud.ec2.describe_key_pairs(KeyNames=[request.key.name])["KeyPairs"][0]
    assert tag_dict(pair["Tags"])[TAG_RUN_ID] == RUN_ID
    assert [i.id for i in cloud.find_run_instances(RUN_ID)] == [instance_id]


def test_on_demand_launch_has_no_spot_options(cloud: AwsCloud, tags: dict[str, str], image_id: str) -> None:
    instance_id = cloud.launch(launch_request(cloud, tags, image_id, spot=False, max_price=None))
    data = cloud.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert "InstanceLifecycle" not in data


def test_private_key_is_0600_in_0700_folder_and_reused(cloud: AwsCloud, tags: dict[str, str]) -> None:
    first = cloud.ensure_key_pair(RUN_ID, tags)
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.path.parent.stat().st_mode) == 0o700
    assert first.path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    again = cloud.ensure_key_pair(RUN_ID, tags)
    assert again == first
    assert len(cloud.ec2.describe_key_pairs()["KeyPairs"]) == 1


def test_loose_key_permissions_refused(cloud: AwsCloud, tags: dict[str, str]) -> None:
    key = cloud.ensure_key_pair(RUN_ID, tags)
    os.chmod(key.path, 0o644)
    with pytest.raises(InputError) as info:
        cloud.ensure_key_pair(RUN_ID, tags)
    assert "others could read the private key" in info.value.message
    assert info.value.hint == f"Run: chmod 600 {key.path}"
    os.chmod(key.path, 0o600)
    os.chmod(key.path.parent, 0o755)
    with pytest.raises(InputError, match="permissions 755"):
        cloud.ensure_key_pair(RUN_ID, tags)


def test_lost_private_key_replaces_the_pair(cloud: AwsCloud, tags: dict[str, str]) -> None:
    first = cloud.ensure_key_pair(RUN_ID, tags)
    first.path.unlink()
    second = cloud.ensure_key_pair(RUN_ID, tags)
    assert second.path.exists() and stat.S_IMODE(second.path.stat().st_mode) == 0o600


# --- injected faults (moto raises none of them itself) ----------------------------------


class _Body:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def ec2_error(code: str, status: int = 400, message: str = "injected") -> AWSResponse:
    body = (
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error>"
        "</Errors><RequestID>injected</RequestID></Response>"
    ).encode()
    return AWSResponse("https://ec2.us-east-1.amazonaws.com/", status, {}, _Body(body))  # type: ignore[arg-type]


def inject(
    cloud: AwsCloud, operation: str, responses: list[AWSResponse], seen: list[dict[str, list[str]]]
) -> Callable[..., Any]:
    """Fail the next len(responses) calls of ``operation``; record every attempt's parameters."""

    def before_send(request: Any, **_: Any) -> AWSResponse | None:
        seen.append(parse_qs(request.body.decode() if isinstance(request.body, bytes) else request.body))
        return responses.pop(0) if responses else None

    cloud.ec2.meta.events.register(f"before-send.ec2.{operation}", before_send)
    return before_send


def test_throttled_run_instances_retries_with_the_same_client_token(
    cloud: AwsCloud, tags: dict[str, str], image_id: str
) -> None:
    request = launch_request(cloud, tags, image_id)
    seen: list[dict[str, list[str]]] = []
    inject(cloud, "RunInstances", [ec2_error("RequestLimitExceeded", 503)] * 2, seen)
    instance_id = cloud.launch(request)
    assert instance_id.startswith("i-")
    assert len(seen) == 3, "botocore's retry logic should have retried twice"
    assert [s["ClientToken"] for s in seen] == [[request.client_token]] * 3


@pytest.mark.parametrize(
    ("code", "error", "words"),
    [
        ("VcpuLimitExceeded", QuotaError, "All G and VT Spot Instance Requests"),
        ("MaxSpotInstanceCountExceeded", QuotaError, "Service Quotas"),
        ("InsufficientInstanceCapacity", CapacityError, "another zone"),
        ("SpotMaxPriceTooLow", PriceError, "max_price"),
        ("UnauthorizedOperation", CredentialsError, "IAM permission"),
        (
            "AccessDeniedException",
            CredentialsError,
            "Grant ec2:RunInstances to this user or role (`cloudtrain iam-policy`",
        ),
        ("SomethingNew", CloudError, None),
    ],
)
def test_launch_errors_become_cloudtrain_errors(
    cloud: AwsCloud,
    tags: dict[str, str],
    image_id: str,
    code: str,
    error: type[Exception],
    words: str | None,
) -> None:
    request = launch_request(cloud, tags, image_id)
    inject(cloud, "RunInstances", [ec2_error(code)], [])
    with pytest.raises(error) as info:
        cloud.launch(request)
    assert "injected" in str(info.value)  # AWS's own message is kept
    if words:
        assert words in (info.value.hint or "")  # type: ignore[attr-defined]
    assert cloud.ec2.describe_instances()["Reservations"] == []


def test_missing_credentials(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    # Signing fails before anything is sent; the endpoint is a closed loopback port regardless.
    cloud = AwsCloud(settings.with_(endpoint_url="http://127.0.0.1:9"), "us-east-1")
    with pytest.raises(CredentialsError, match="no AWS credentials") as info:
        cloud.spot_prices(["g4dn.xlarge"])
    assert "--dry-run" in (info.value.hint or "")


# --- teardown ---------------------------------------------------------------------------


def test_terminate_is_confirmed_and_group_deleted(
    cloud: AwsCloud, tags: dict[str, str], image_id: str
) -> None:
    request = launch_request(cloud, tags, image_id)
    instance_id = cloud.launch(request)
    cloud.wait_running(instance_id, delay=1)
    cloud.terminate(instance_id, delay=1)
    assert cloud.describe(instance_id).state == "terminated"
    assert cloud.find_run_instances(RUN_ID) == []
    cloud.delete_security_group(request.security_group_id)
    groups = cloud.ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [f"cloudtrain-{RUN_ID}"]}]
    )["SecurityGroups"]
    assert groups == []
    cloud.delete_security_group(request.security_group_id)  # already gone: no error
    cloud.terminate(instance_id, delay=1)  # terminating twice is harmless


def test_terminate_unconfirmed_is_an_error(cloud: AwsCloud, tags: dict[str, str], image_id: str) -> None:
    instance_id = cloud.launch(launch_request(cloud, tags, image_id))
    # AWS accepts the request, but the instance never leaves 'running'.
    stuck = {"TerminatingInstances": [{"InstanceId": instance_id}]}
    cloud.ec2.terminate_instances = lambda **_: stuck  # type: ignore[method-assign]
    with pytest.raises(CloudError, match="not confirmed terminated"):
        cloud.terminate(instance_id, delay=1, max_attempts=2)


def test_image_by_name_and_missing_image(cloud: AwsCloud) -> None:
    with pytest.raises(InputError, match="no image the cloudtrain image"):
        cloud.resolve_image(None)
    image_id = cloud.ec2.register_image(Name="my-image")["ImageId"]
    assert cloud.resolve_image("my-image").id == image_id
    assert cloud.resolve_image(image_id).id == image_id


# --- prices -----------------------------------------------------------------------------


def test_spot_prices_from_moto_are_its_placeholders(settings: Settings) -> None:
    with mock_aws():
        prices = AwsCloud(settings, "us-east-1").spot_prices(["g4dn.xlarge"])
    assert prices and {p.instance_type for p in prices} == {"g4dn.xlarge"}
    assert {p.price for p in prices} == {0.00001}
    assert all(p.timestamp.year == 2006 and p.timestamp.tzinfo is not None for p in prices)


def test_simulated_aws_quotes_the_simulated_price(settings: Settings) -> None:
    from cloudtrain.catalog import load_catalog

    with simulated_aws(settings) as sim:
        assert sim.endpoint_url and sim.endpoint_url.startswith("http://127.0.0.1:")
        assert sim.simulated and sim.ssh_cidr == "127.0.0.1/32"
        prices = AwsCloud(sim, "us-east-1").spot_prices(["g5.xlarge"], ["us-east-1a"])
        # Every boto3 client of the run points at it: the simulator's EC2 sees the same world.
        direct = boto3.client("ec2", region_name="us-east-1", endpoint_url=sim.endpoint_url)
        assert direct.describe_regions()["Regions"]
    itype = load_catalog().get("g5.xlarge")
    assert itype is not None
    assert [(p.zone, p.price) for p in prices] == [
        ("us-east-1a", estimated_spot(itype.on_demand["us-east-1"]))
    ]
    assert (utcnow() - prices[0].timestamp) < timedelta(minutes=5)


def test_key_pair_record_is_frozen() -> None:
    pair = KeyPair("n", Path("/x"))
    with pytest.raises(AttributeError):
        pair.name = "m"  # type: ignore[misc]


def test_one_region_order_for_every_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AWS_REGION, then AWS_DEFAULT_REGION, then the profile's, then us-east-1 (the AWS
    CLI's order); a dry-run never reads the profile."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = ap-south-1\n[profile work]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert default_region(Settings.from_env()) == "ap-south-1"
    assert default_region(Settings.from_env(profile="work")) == "eu-west-1"
    assert default_region(Settings.from_env(profile="work").with_(simulated=True)) == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    assert default_region(Settings.from_env(profile="work")) == "ca-central-1"
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert default_region(Settings.from_env(profile="work")) == "us-west-2"
    config.write_text("[profile work]\n")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert default_region(Settings.from_env(profile="work")) == "us-east-1"
