"""S3 data sources: the run's instance profile (only the job's buckets), the agent's fetch,
and a dry-run that reads S3 data on the simulated instance with the simulated role's
credentials, never the user's keys."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from test_aws import RUN_ID, _Body, cloud, ec2_error, image_id, inject, launch_request, tags  # noqa: F401
from test_run_e2e import cloudtrain, only_run, py, sim_image, status, write_job

from cloudtrain.agent.errors import AgentError
from cloudtrain.agent.fetch_s3 import fetch, relative_key
from cloudtrain.cloud import aws
from cloudtrain.cloud.aws import (
    S3_POLICY_NAME,
    SIMULATED_CREDENTIALS,
    AwsCloud,
    s3_buckets,
)
from cloudtrain.cloud.simulator import ensure_simulator, simulated_aws
from cloudtrain.errors import CredentialsError
from cloudtrain.settings import Settings

__all__ = ["sim_image"]  # the e2e fixture, imported for its use here

RUN_ID = "s3-data-20261128-120000-abcd"
USER_SECRET = "fake-secret-never-leaves-this-machine"  # tests/conftest.py's


def s3_client(endpoint: str | None) -> Any:
    return boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=SIMULATED_CREDENTIALS[0],
        aws_secret_access_key=SIMULATED_CREDENTIALS[1],
    )


# --- the instance profile ---------------------------------------------------------------


def test_s3_buckets_once_each() -> None:
    assert s3_buckets(["s3://b2/x/", "s3://b1", "s3://b2/y", "data/local"]) == ["b1", "b2"]


def test_instance_profile_allows_exactly_the_jobs_buckets(cloud: AwsCloud, tags: dict[str, str]) -> None:
    name = cloud.ensure_instance_profile(RUN_ID, ["data-a", "data-b", "data-a"], tags)
    assert name == f"cloudtrain-{RUN_ID}"
    iam = cloud.iam
    role = iam.get_role(RoleName=name)["Role"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert {t["Key"]: t["Value"] for t in iam.list_role_tags(RoleName=name)["Tags"]} == tags
    assert iam.list_role_policies(RoleName=name)["PolicyNames"] == [S3_POLICY_NAME]
    document = iam.get_role_policy(RoleName=name, PolicyName=S3_POLICY_NAME)["PolicyDocument"]
    policy = json.loads(document) if isinstance(document, str) else document
    allowed = {(a, r) for s in policy["Statement"] for a in s["Action"] for r in s["Resource"]}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    assert allowed == {
        ("s3:ListBucket", "arn:aws:s3:::data-a"),
        ("s3:ListBucket", "arn:aws:s3:::data-b"),
        ("s3:GetObject", "arn:aws:s3:::data-a/*"),
        ("s3:GetObject", "arn:aws:s3:::data-b/*"),
    }
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]

    # Reused on relaunch: the same profile, one role in it, the policy rewritten to the buckets.
    assert cloud.ensure_instance_profile(RUN_ID, ["data-c"], tags) == name
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]
    document = iam.get_role_policy(RoleName=name, PolicyName=S3_POLICY_NAME)["PolicyDocument"]
    policy = json.loads(document) if isinstance(document, str) else document
    assert {r for s in policy["Statement"] for r in s["Resource"]} == {
        "arn:aws:s3:::data-c",
        "arn:aws:s3:::data-c/*",
    }

    cloud.delete_instance_profile(name)
    for call in (
        lambda: iam.get_instance_profile(InstanceProfileName=name),
        lambda: iam.get_role(RoleName=name),
    ):
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.response["Error"]["Code"] == "NoSuchEntity"
    cloud.delete_instance_profile(name)  # already gone: nothing to do


def iam_error(code: str, status: int = 403, message: str = "injected") -> AWSResponse:
    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message>"
        "</Error><RequestId>injected</RequestId></ErrorResponse>"
    ).encode()
    return AWSResponse("https://iam.amazonaws.com/", status, {}, _Body(body))  # type: ignore[arg-type]


def test_create_role_denied_names_the_permission(cloud: AwsCloud, tags: dict[str, str]) -> None:
    cloud.iam.meta.events.register("before-send.iam.CreateRole", lambda **_: iam_error("AccessDenied"))
    with pytest.raises(CredentialsError) as info:
        cloud.ensure_instance_profile(RUN_ID, ["data-a"], tags)
    assert "iam:CreateRole" in (info.value.hint or "")


def test_launch_with_the_profile_records_it(cloud: AwsCloud, tags: dict[str, str], image_id: str) -> None:
    name = cloud.ensure_instance_profile(RUN_ID, ["data-a"], tags)
    instance_id = cloud.launch(launch_request(cloud, tags, image_id, instance_profile=name))
    associations = cloud.ec2.describe_iam_instance_profile_associations(
        Filters=[{"Name": "instance-id", "Values": [instance_id]}]
    )["IamInstanceProfileAssociations"]
    assert [a["IamInstanceProfile"]["Arn"].rsplit("/", 1)[-1] for a in associations] == [name]


def test_launch_without_a_profile_has_none(cloud: AwsCloud, tags: dict[str, str], image_id: str) -> None:
    instance_id = cloud.launch(launch_request(cloud, tags, image_id))
    associations = cloud.ec2.describe_iam_instance_profile_associations(
        Filters=[{"Name": "instance-id", "Values": [instance_id]}]
    )["IamInstanceProfileAssociations"]
    assert associations == []


def test_launch_waits_out_a_profile_ec2_cannot_see_yet(
    cloud: AwsCloud, tags: dict[str, str], image_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aws, "PROFILE_RETRY_DELAY_S", 0.01)
    name = cloud.ensure_instance_profile(RUN_ID, ["data-a"], tags)
    request = launch_request(cloud, tags, image_id, instance_profile=name)
    seen: list[dict[str, list[str]]] = []
    not_yet = "Value (cloudtrain-x) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"
    inject(cloud, "RunInstances", [ec2_error("InvalidParameterValue", message=not_yet)] * 2, seen)
    assert cloud.launch(request).startswith("i-")
    assert len(seen) == 3
    assert [s["ClientToken"] for s in seen] == [[request.client_token]] * 3
    assert all(s["IamInstanceProfile.Name"] == [name] for s in seen)


# --- the agent's fetch ------------------------------------------------------------------


def test_relative_key() -> None:
    assert relative_key("set/a.txt", "set/") == "a.txt"
    assert relative_key("set/sub/b.txt", "set") == "sub/b.txt"
    assert relative_key("settings/x", "set") is None
    assert relative_key("set", "set") == ""
    assert relative_key("other/a", "set/") is None


@pytest.fixture
def s3_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The in-process simulated S3, and the environment the agent's fetch sees there."""
    with simulated_aws(settings) as sim:
        monkeypatch.setenv("AWS_ENDPOINT_URL", str(sim.endpoint_url))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIASIMULATEDROLE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "simulated-instance-role")
        client = s3_client(sim.endpoint_url)
        client.create_bucket(Bucket="job-data")
        yield client


def test_fetch_preserves_paths_and_skips_what_is_there(s3_env: Any, tmp_path: Path) -> None:
    s3_env.put_object(Bucket="job-data", Key="set/a.txt", Body=b"alpha")
    s3_env.put_object(Bucket="job-data", Key="set/sub/b.txt", Body=b"beta!")
    s3_env.put_object(Bucket="job-data", Key="settings/c.txt", Body=b"not under set/")
    dst = tmp_path / "work" / "data" / "set"
    assert fetch("s3://job-data/set/", str(dst)) == {"files": 2, "bytes": 10, "skipped": 0}
    assert (dst / "a.txt").read_bytes() == b"alpha"
    assert (dst / "sub" / "b.txt").read_bytes() == b"beta!"
    assert sorted(p.name for p in dst.rglob("*")) == ["a.txt", "b.txt", "sub"]  # no temp files left
    assert fetch("s3://job-data/set/", str(dst)) == {"files": 0, "bytes": 0, "skipped": 2}
    s3_env.put_object(Bucket="job-data", Key="set/a.txt", Body=b"ALPHA, changed")
    assert fetch("s3://job-data/set", str(dst)) == {"files": 2, "bytes": 19, "skipped": 0}  # other src
    assert (dst / "a.txt").read_bytes() == b"ALPHA, changed"


def test_fetch_refuses_keys_that_escape(s3_env: Any, tmp_path: Path) -> None:
    s3_env.put_object(Bucket="job-data", Key="set/../../escape.txt", Body=b"x")
    with pytest.raises(AgentError, match="outside the destination"):
        fetch("s3://job-data/set/", str(tmp_path / "dst"))
    assert not (tmp_path / "escape.txt").exists()


def test_fetch_of_an_empty_prefix_is_an_error(s3_env: Any, tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="no objects under"):
        fetch("s3://job-data/nothing/", str(tmp_path / "dst"))


# --- end to end -------------------------------------------------------------------------


def test_dry_run_reads_s3_data_with_the_instance_profile(
    sim_image: Path, tmp_path: Path, settings: Settings
) -> None:
    sim = ensure_simulator(settings, image=sim_image)
    s3 = s3_client(sim.endpoint_url)
    s3.create_bucket(Bucket="job-bucket")
    s3.put_object(Bucket="job-bucket", Key="set/a.txt", Body=b"content of a")
    s3.put_object(Bucket="job-bucket", Key="set/sub/b.txt", Body=b"content of b")
    code = (
        "import os\n"
        "print('A=' + open('data/set/a.txt').read(), flush=True)\n"
        "print('B=' + open('data/set/sub/b.txt').read(), flush=True)\n"
        "print('key', os.environ.get('AWS_SECRET_ACCESS_KEY'), flush=True)\n"
    )
    job = write_job(
        tmp_path / "job", py(code), extra="data: [{src: 's3://job-bucket/set/', dst: data/set}]\n"
    )
    done = cloudtrain("run", str(job), "--dry-run", "--out", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    assert "instance profile cloudtrain-" in done.stderr
    assert "fetched s3://job-bucket/set/ -> data/set: 2 files" in done.stderr
    run_dir = only_run(tmp_path / "runs")
    log = (run_dir / "logs" / "train.log").read_text()
    assert "A=content of a" in log and "B=content of b" in log
    assert USER_SECRET not in log and "key fake" not in log

    record = status(run_dir.name)
    assert record["state"] == "succeeded"
    assert any(e["kind"] == "instance-profile-deleted" for e in record["events"])
    iam = AwsCloud(sim, "us-east-1").iam
    name = f"cloudtrain-{run_dir.name}"
    with pytest.raises(ClientError):
        iam.get_instance_profile(InstanceProfileName=name)
    with pytest.raises(ClientError):
        iam.get_role(RoleName=name)

    sandbox = Path(os.environ["CLOUDTRAIN_HOME"]) / "sim" / "instances"
    checked = 0
    for path in sandbox.rglob("*"):
        if path.is_file() and "envs" not in path.parts:
            assert USER_SECRET.encode() not in path.read_bytes(), path
            checked += 1
    assert checked > 0


def test_simulator_finds_the_profile_an_instance_was_launched_with(
    cloud: AwsCloud, tags: dict[str, str], image_id: str
) -> None:
    from moto.ec2.models import ec2_backends

    from cloudtrain.cloud.simulator import ACCOUNT_ID, instance_profile_name

    name = cloud.ensure_instance_profile(RUN_ID, ["data-a"], tags)
    request = launch_request(cloud, tags, image_id, instance_profile=name)
    with_profile = cloud.launch(request)
    without = cloud.launch(replace(request, instance_profile=None, client_token="other"))
    backend = ec2_backends[ACCOUNT_ID]["us-east-1"]
    assert instance_profile_name(backend, with_profile) == name
    assert instance_profile_name(backend, without) is None
