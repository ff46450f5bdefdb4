"""Where moto is lenient: AWS's limits on names and tags (aws_contract.py, applied to every
test's calls by conftest), and the names cloudtrain gives a run's resources kept within
them for the longest job name the job file allows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
from aws_contract import violations

from cloudtrain.cloud.aws import AwsCloud, run_tags
from cloudtrain.cloud.simulator import simulated_aws
from cloudtrain.records import new_run_id, utcnow
from cloudtrain.settings import Settings
from cloudtrain.spec import NAME_RE

LONGEST_NAME = "a" * int(NAME_RE.split(",")[1].split("}")[0]) + "b"  # NAME_RE: 1 + up to 39 more


@pytest.fixture
def cloud(settings: Settings) -> Iterator[AwsCloud]:
    with simulated_aws(settings) as sim:
        yield AwsCloud(sim.with_(ssh_cidr="203.0.113.7/32"), "us-east-1")


def test_the_longest_job_name_gives_names_aws_accepts(cloud: AwsCloud) -> None:
    """Each call below passes aws_contract's check (conftest), which refuses what AWS would:
    before the fix, the role `cloudtrain-<run id>` was 72 characters, IAM's limit 64."""
    assert len(LONGEST_NAME) == 40
    run_id = new_run_id(LONGEST_NAME)
    tags = run_tags(run_id, "tester@testhost", utcnow() + timedelta(hours=5))
    key = cloud.ensure_key_pair(run_id, tags)
    group = cloud.create_security_group(run_id, "203.0.113.7/32", tags)
    profile = cloud.ensure_instance_profile(run_id, ["data-bucket"], tags)
    assert key.name == f"cloudtrain-{run_id}" and group.startswith("sg-")
    assert len(profile) <= 64 and profile.startswith(f"cloudtrain-{LONGEST_NAME}")
    assert cloud.iam.get_role(RoleName=profile)["Role"]["RoleName"] == profile
    # two runs of one long name in one second differ in their last 4 hex: so do their profiles
    other = run_id[:-4] + ("0000" if run_id[-4:] != "0000" else "0001")
    assert AwsCloud.instance_profile_name(other) != profile
    # a short one keeps the plain name
    assert AwsCloud.instance_profile_name("digits-mlp-20261128-120000-abcd") == (
        "cloudtrain-digits-mlp-20261128-120000-abcd"
    )
    assert [r.id for r in cloud.owned_instance_profiles("tester@testhost")] == [profile]  # gc finds it by tag


@pytest.mark.parametrize(
    ("service", "operation", "params", "rule"),
    [
        ("iam", "CreateRole", {"RoleName": "r" * 65, "AssumeRolePolicyDocument": "{}"}, "over 64"),
        ("iam", "CreateRole", {"RoleName": "no spaces", "AssumeRolePolicyDocument": "{}"}, "does not match"),
        ("iam", "CreateInstanceProfile", {"InstanceProfileName": "p" * 129}, "over 128"),
        ("iam", "TagRole", {"RoleName": "r", "Tags": [{"Key": "k", "Value": "v" * 257}]}, "over 256"),
        ("ec2", "CreateKeyPair", {"KeyName": "k" * 256}, "over 255"),
        ("ec2", "CreateKeyPair", {"KeyName": "clé"}, "not ASCII"),
        ("ec2", "CreateSecurityGroup", {"GroupName": "sg-mine", "Description": "d"}, "does not match"),
        ("ec2", "CreateSecurityGroup", {"GroupName": "g", "Description": "it's"}, "does not match"),
        ("ec2", "CreateTags", {"Resources": ["i-1"], "Tags": [{"Key": "k" * 128, "Value": "v"}]}, "over 127"),
    ],
)
def test_the_contract_refuses_what_aws_refuses(service: str, operation: str, params: dict, rule: str) -> None:
    model = boto3.session.Session().client(service, region_name="us-east-1")._service_model
    found = violations(model.operation_model(operation), params)
    assert len(found) == 1 and rule in found[0], found


def test_a_call_aws_would_refuse_fails_the_test_before_moto_sees_it(cloud: AwsCloud) -> None:
    with pytest.raises(AssertionError, match="CreateRole.RoleName .* 72 characters, over 64"):
        cloud.iam.create_role(RoleName="r" * 72, AssumeRolePolicyDocument="{}")
    assert cloud.iam.list_roles()["Roles"] == []


# --- recorded shapes: the console, the instance metadata, AWS's launch errors --------------

CONTRACTS = Path(__file__).parent / "data" / "contracts"


def image(cloud: AwsCloud) -> str:
    """A cloudtrain image for launch_request to find."""
    return str(cloud.ec2.register_image(Name="cloudtrain-gpu-20261128")["ImageId"])


def test_the_fingerprints_of_an_ubuntu_console_are_those_of_its_block() -> None:
    from cloudtrain.remote.session import parse_console_fingerprints

    console = (CONTRACTS / "console-ubuntu-22.04.txt").read_bytes().decode()  # its CRLFs kept
    assert "\r\n" in console and "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----" in console
    found = parse_console_fingerprints(console)
    assert found == {
        "SHA256:MY+fgSueiew72UjACvx1F0mlonWzpwlDYojaYvTLNvs",  # ECDSA
        "SHA256:PV9Plc2xzfxxAU76Gmaf1CWZoM4gANkUpAnki8yu1YQ",  # ED25519
        "SHA256:9faRaLujz6HiqA3/g5tI2zbfNvqHbBzZ19UI86swh0Q",  # RSA
    }  # not ssh-keygen's line from when it generated the key, outside the block
    # a console read while cloud-init is still writing the block has none yet: keep waiting
    cut = console[: console.index("(ED25519)")]
    assert parse_console_fingerprints(cut) == frozenset()


def test_the_instance_metadata_notices_as_aws_documents_them() -> None:
    from cloudtrain.agent.imds import REBALANCE, SPOT, Poll, notice_from_poll

    action = json.loads((CONTRACTS / "spot-instance-action.json").read_text())
    rebalance = json.loads((CONTRACTS / "rebalance-recommendation.json").read_text())
    seen = "2026-12-06T12:20:01Z"
    notice = notice_from_poll(Poll(instance_action=action), None, seen)
    assert notice == {"kind": SPOT, "action": "terminate", "time": "2026-12-06T12:22:00Z", "seen_at": seen}
    early = notice_from_poll(Poll(rebalance=rebalance), None, seen)
    assert early is not None and (early["kind"], early["time"]) == (REBALANCE, "2026-12-06T12:10:00Z")


ERRORS = json.loads((CONTRACTS / "aws-errors.json").read_text())["errors"]


@pytest.mark.parametrize(
    ("case", "error", "hint_words"),
    [
        ("capacity", "CapacityError", "another zone"),
        ("quota", "QuotaError", "Service Quotas"),
        ("price", "PriceError", "max_price"),
    ],
)
def test_launch_errors_as_aws_sends_them(
    cloud: AwsCloud, monkeypatch: pytest.MonkeyPatch, case: str, error: str, hint_words: str
) -> None:
    from botocore.retries.standard import ExponentialBackoff
    from test_aws import ec2_error, inject, launch_request

    from cloudtrain import errors

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    recorded = ERRORS[case]
    run_id = "digits-mlp-20261128-120000-abcd"
    tags = run_tags(run_id, "tester@testhost", utcnow() + timedelta(hours=5))
    refusal = ec2_error(recorded["code"], recorded["status"], recorded["message"])
    seen: list[dict[str, list[str]]] = []
    inject(cloud, "RunInstances", [refusal] * 30, seen)
    with pytest.raises(getattr(errors, error)) as raised:
        cloud.launch(launch_request(cloud, tags, image(cloud)))
    assert recorded["message"] in str(raised.value)  # AWS's own words reach the user
    assert raised.value.hint is not None and hint_words in raised.value.hint
    # AWS answers a capacity shortage with a 500, which botocore retries: 9 attempts (its
    # retries dict's max_attempts, 8, counts the retries after the first), with backoff,
    # up to a minute before the next zone is tried; a 400 is final
    assert len(seen) == (9 if recorded["status"] >= 500 else 1)


def test_a_profile_iam_has_not_propagated_is_waited_for(
    cloud: AwsCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_aws import ec2_error, inject, launch_request

    from cloudtrain.cloud import aws

    monkeypatch.setattr(aws, "PROFILE_RETRY_DELAY_S", 0.01)
    recorded = ERRORS["profile-not-propagated"]
    run_id = "digits-mlp-20261128-120000-abcd"
    tags = run_tags(run_id, "tester@testhost", utcnow() + timedelta(hours=5))
    profile = cloud.ensure_instance_profile(run_id, ["data"], tags)
    not_yet = [ec2_error(recorded["code"], recorded["status"], recorded["message"]) for _ in range(2)]
    seen: list[dict[str, list[str]]] = []
    inject(cloud, "RunInstances", not_yet, seen)
    instance_id = cloud.launch(launch_request(cloud, tags, image(cloud), instance_profile=profile))
    assert instance_id.startswith("i-") and len(seen) == 3  # twice refused, then launched
    assert len({s["ClientToken"][0] for s in seen}) == 1  # the same token: never two instances


def test_an_instance_that_refuses_latest_console_output_is_asked_without(cloud: AwsCloud) -> None:
    from test_aws import ec2_error, inject

    seen: list[dict[str, list[str]]] = []
    inject(
        cloud, "GetConsoleOutput", [ec2_error("UnsupportedOperation", 400, "Latest is not supported")], seen
    )
    reply = cloud.ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)
    instance_id = reply["Instances"][0]["InstanceId"]
    assert isinstance(cloud.console_output(instance_id), str)
    cloud.console_output(instance_id)
    assert [s.get("Latest") for s in seen] == [["true"], None, None]  # refused once, then never asked
    inject(cloud, "GetConsoleOutput", [ec2_error("UnauthorizedOperation", 403, "no")], [])
    with pytest.raises(Exception, match="not allowed"):  # a refusal of the call itself still says so
        cloud.console_output(instance_id)
