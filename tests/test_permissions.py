"""`cloudtrain iam-policy` and the operation list it is made of (permissions.py); the
whole suite's AWS calls are held to that list by conftest (OPERATIONS_SEEN)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_run_e2e import CLOUDTRAIN

from cloudtrain import permissions
from cloudtrain.cloud.aws import AwsCloud, make_client
from cloudtrain.cloud.simulator import simulated_aws
from cloudtrain.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[1] / "jobs" / "digits-mlp" / "job.yaml"


def statements(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in policy["Statement"]}


def listify(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_the_policy_grants_every_listed_operation_and_scopes_iam() -> None:
    done = subprocess.run([CLOUDTRAIN, "iam-policy"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    policy = json.loads(done.stdout)
    granted = {a for s in policy["Statement"] for a in listify(s["Action"])}
    needed = {a for op in permissions.OPERATIONS for a in op.needs if op.scope != permissions.BUCKET}
    assert granted == needed
    by_sid = statements(policy)
    # nothing of IAM on "*" but the two list calls gc makes
    anywhere = {a for s in policy["Statement"] if s["Resource"] == "*" for a in listify(s["Action"])}
    assert {a for a in anywhere if a.startswith("iam:")} == {"iam:ListRoles", "iam:ListInstanceProfiles"}
    # roles: made only with the boundary, passed only to EC2, only cloudtrain-*
    bounded = by_sid["RunRolesOnlyWithTheBoundary"]
    assert bounded["Resource"] == "arn:aws:iam::*:role/cloudtrain-*"
    assert "iam:CreateRole" in bounded["Action"] and "iam:PutRolePolicy" in bounded["Action"]
    assert bounded["Condition"] == {
        "StringEquals": {
            "iam:PermissionsBoundary": "arn:aws:iam::${aws:PrincipalAccount}:policy/cloudtrain-instance-boundary"
        }
    }
    passing = by_sid["PassRunRolesToEc2Only"]
    assert passing["Action"] == ["iam:PassRole"] and passing["Resource"] == "arn:aws:iam::*:role/cloudtrain-*"
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert by_sid["RunInstanceProfiles"]["Resource"] == "arn:aws:iam::*:instance-profile/cloudtrain-*"
    linked = by_sid["SpotServiceLinkedRole"]
    assert linked["Action"] == ["iam:CreateServiceLinkedRole"]
    assert linked["Condition"] == {"StringLike": {"iam:AWSServiceName": "spot.amazonaws.com"}}
    assert "JobBuckets" not in by_sid


def test_with_s3_names_the_bucket_and_the_other_policies_print(tmp_path: Path) -> None:
    done = subprocess.run([CLOUDTRAIN, "iam-policy", "--with-s3", "my-data"], capture_output=True, text=True)
    bucket = statements(json.loads(done.stdout))["JobBuckets"]
    assert bucket["Action"] == ["s3:ListBucket"] and bucket["Resource"] == "arn:aws:s3:::my-data"
    two = [CLOUDTRAIN, "iam-policy", "--with-s3", "my-data", "--with-s3", "my-checkpoints"]
    buckets = statements(json.loads(subprocess.run(two, capture_output=True, text=True).stdout))["JobBuckets"]
    assert buckets["Resource"] == ["arn:aws:s3:::my-checkpoints", "arn:aws:s3:::my-data"]
    boundary = json.loads(
        subprocess.run([CLOUDTRAIN, "iam-policy", "--boundary"], capture_output=True).stdout
    )
    assert {a for s in boundary["Statement"] for a in listify(s["Action"])} == {
        "s3:ListBucket",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
    }
    instance = json.loads(
        subprocess.run([CLOUDTRAIN, "iam-policy", "--instance"], capture_output=True).stdout
    )
    assert any("arn:aws:s3:::DATA-BUCKET/*" in listify(s["Resource"]) for s in instance["Statement"])
    both = subprocess.run(
        [CLOUDTRAIN, "iam-policy", "--boundary", "--instance"], capture_output=True, text=True
    )
    assert both.returncode == 2 and "choose one" in both.stderr


@pytest.fixture
def cloud(settings: Settings) -> Iterator[AwsCloud]:
    with simulated_aws(settings) as sim:
        yield AwsCloud(sim, "us-east-1")


def test_a_runs_role_has_the_boundary(cloud: AwsCloud) -> None:
    from cloudtrain.cloud.aws import run_tags
    from cloudtrain.records import utcnow

    tags = run_tags("r-20261206-120000-abcd", "tester@testhost", utcnow())
    name = cloud.ensure_instance_profile("r-20261206-120000-abcd", ["data"], tags)
    role = cloud.iam.get_role(RoleName=name)["Role"]
    assert role["PermissionsBoundary"]["PermissionsBoundaryArn"] == (
        f"arn:aws:iam::{cloud.caller_identity().account}:policy/cloudtrain-instance-boundary"
    )
    # the simulated account has it, as a user's account has after the README's set-up
    policies = cloud.iam.list_policies(Scope="Local")["Policies"]
    assert [p["PolicyName"] for p in policies] == ["cloudtrain-instance-boundary"]


def test_operations_are_recorded_from_cloudtrains_code_only(cloud: AwsCloud, tmp_path: Path) -> None:
    """What the suite-wide check rests on: a `cloudtrain` process records its calls, a call
    a test makes with cloudtrain's own client does not count."""
    seen = tmp_path / "seen.txt"
    os.environ[permissions.RECORD_ENV], saved = str(seen), os.environ[permissions.RECORD_ENV]
    try:
        client = make_client(cloud.settings, "ec2", "us-east-1")
        client.describe_regions()  # a test's own call
        assert not seen.exists()
        cloud.ec2 = client
        cloud.spot_prices(["g4dn.xlarge"])  # cloudtrain's
        assert seen.read_text().split() == ["ec2:DescribeSpotPriceHistory"]
        done = subprocess.run(
            [CLOUDTRAIN, "plan", str(EXAMPLE), "--dry-run"],
            capture_output=True,
            text=True,
            env=dict(os.environ),
        )
        assert done.returncode == 0, done.stderr
        assert seen.read_text().split().count("ec2:DescribeSpotPriceHistory") == 2  # and the process's
    finally:
        os.environ[permissions.RECORD_ENV] = saved
    assert permissions.record("ec2", "X", environ={}) is None  # no variable: nothing written


def test_an_access_denied_names_the_actions_and_the_command() -> None:
    from botocore.exceptions import ClientError

    from cloudtrain.cloud.aws import translate

    error = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "RunInstances")
    hint = translate(error, "HeadBucket").hint
    assert hint is not None and "s3:ListBucket" in hint and "cloudtrain iam-policy" in hint


def test_a_missing_boundary_policy_says_how_to_create_it() -> None:
    from botocore.exceptions import ClientError

    from cloudtrain.cloud.aws import translate

    message = (
        "Scope ARN: arn:aws:iam::123456789012:policy/cloudtrain-instance-boundary does not exist "
        "or is not attachable."
    )
    error = ClientError({"Error": {"Code": "NoSuchEntity", "Message": message}}, "CreateRole")
    translated = translate(error, "CreateRole")
    assert "permissions boundary" in translated.message
    assert translated.hint is not None and "iam-policy --boundary" in translated.hint
