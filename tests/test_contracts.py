"""Where moto is lenient: AWS's limits on names and tags (aws_contract.py, applied to every
test's calls by conftest), and the names cloudtrain gives a run's resources kept within
them for the longest job name the job file allows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

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
