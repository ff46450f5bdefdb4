"""`cloudtrain doctor` on broken and sound setups: moto for EC2 and STS, botocore's Stubber
for Service Quotas (moto has none for EC2), real files for the key check, the real CLI.

No test reaches AWS: AWS calls go to a moto server on loopback, to a stubbed client, or
(without credentials, where nothing is sent) to a closed loopback port.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber
from test_aws import RUN_ID, cloud, image_id, launch_request, tags  # noqa: F401
from test_image import STUB_PYTHON
from test_run_e2e import CLOUDTRAIN

from cloudtrain.catalog import load_catalog
from cloudtrain.cloud import simimage
from cloudtrain.cloud.aws import AwsCloud
from cloudtrain.cloud.simulator import simulated_aws
from cloudtrain.doctor import (
    QUOTA_CHECKS,
    Finding,
    Report,
    Status,
    check_keys,
    check_leftovers,
    check_plan_quota,
    check_quotas,
    check_sim_image,
    diagnose,
    region_finding,
)
from cloudtrain.ledger import Ledger, RunRow
from cloudtrain.planner import Plan, plan
from cloudtrain.records import RunState, utcnow
from cloudtrain.settings import Settings
from cloudtrain.spec import load_job

CLOSED_PORT = "http://127.0.0.1:9"  # loopback, nothing listens: a call that is sent fails at once


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command in a child process (its environment: this test's, fake keys included)."""
    return subprocess.run(
        [CLOUDTRAIN, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=180,
        check=False,
    )


def by_check(report: Report) -> dict[str, Finding]:
    return {f.check: f for f in report.findings}


def statuses(report: Report) -> dict[str, str]:
    return {f.check: f.status.value for f in report.findings}


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials anywhere boto3 looks: not in the environment, empty config files."""
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "empty-config").write_text("")
    (tmp_path / "empty-credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", CLOSED_PORT)  # never AWS, even if something were sent


@pytest.fixture
def moto_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A moto server on loopback that the plain (not dry-run) CLI reaches with the fake keys."""
    with simulated_aws(settings) as sim:
        assert sim.endpoint_url
        monkeypatch.setenv("AWS_ENDPOINT_URL", sim.endpoint_url)
        yield sim


def quota_reply(code: str, name: str, value: float) -> dict[str, Any]:
    """GetServiceQuota's response, in the real shape (the Stubber checks it against the model)."""
    return {
        "Quota": {
            "ServiceCode": "ec2",
            "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
            "QuotaArn": f"arn:aws:servicequotas:us-east-1:123456789012:ec2/{code}",
            "QuotaCode": code,
            "QuotaName": name,
            "Value": value,
            "Unit": "None",
            "Adjustable": True,
            "GlobalQuota": False,
            "UsageMetric": {
                "MetricNamespace": "AWS/Usage",
                "MetricName": "ResourceCount",
                "MetricDimensions": {
                    "Class": "None",
                    "Resource": "vCPU",
                    "Service": "EC2",
                    "Type": "Resource",
                },
                "MetricStatisticRecommendation": "Maximum",
            },
            "QuotaAppliedAtLevel": "ACCOUNT",
        }
    }


QUOTA_NAMES = {
    "L-3819A6DF": "All G and VT Spot Instance Requests",
    "L-7212CCBC": "All P Spot Instance Requests",
    "L-DB2E81BA": "Running On-Demand G and VT instances",
    "L-417A185B": "Running On-Demand P instances",
}


@pytest.fixture
def stubbed(settings: Settings) -> Iterator[tuple[AwsCloud, Stubber]]:
    """A cloud whose Service Quotas client answers only what the test queues."""
    cloud = AwsCloud(settings.with_(endpoint_url=CLOSED_PORT), "us-east-1", max_attempts=1)
    with Stubber(cloud.quotas) as stubber:
        yield cloud, stubber
        stubber.assert_no_pending_responses()


# --- credentials --------------------------------------------------------------------------


def test_no_credentials_fails_with_the_fix_and_skips_the_aws_checks(
    settings: Settings, no_credentials: None
) -> None:
    report = diagnose(Settings.from_env())
    found = by_check(report)
    assert found["credentials"].status is Status.FAIL
    assert "no AWS credentials found" in found["credentials"].summary
    assert "aws configure" in (found["credentials"].fix or "")
    assert "--profile" in (found["credentials"].fix or "")
    for check in ("quotas", "image", "leftovers"):
        assert found[check].status is Status.SKIP
    assert found["region"].status is Status.OK and found["keys"].status is Status.OK
    assert [f.check for f in report.failed] == ["credentials"]


def test_cli_without_credentials_exits_3_and_prints_the_fix(no_credentials: None) -> None:
    result = cli("doctor")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no AWS credentials found" in result.stdout
    assert "fix: Run `aws configure`" in result.stdout
    assert "1 check(s) failed: credentials" in result.stderr

    result = cli("doctor", "--json")
    assert result.returncode == 3
    data = json.loads(result.stdout)
    assert data["schema"] == 1 and data["ok"] is False and data["simulated"] is False
    assert {f["check"]: f["status"] for f in data["findings"]} == {
        "credentials": "fail",
        "region": "ok",
        "keys": "ok",
        "quotas": "skip",
        "image": "skip",
        "leftovers": "skip",
    }


def test_credentials_and_image_against_moto(moto_env: Settings) -> None:
    """The plain CLI, fake keys, a moto server: whose credentials, and no cloudtrain image."""
    result = cli("doctor", "--json")
    assert result.returncode == 3, result.stdout + result.stderr
    findings = {f["check"]: f for f in json.loads(result.stdout)["findings"]}
    assert findings["credentials"]["status"] == "ok"
    assert findings["credentials"]["data"]["source"] == "env"
    assert findings["credentials"]["data"]["account"] == "123456789012"
    # moto has no Service Quotas for EC2: a warning, not a crash and not a failure
    assert findings["quotas"]["status"] == "warn"
    assert "could not check" in findings["quotas"]["summary"]
    assert "servicequotas:GetServiceQuota" in findings["quotas"]["fix"]
    assert findings["image"]["status"] == "fail"
    assert "no cloudtrain image (cloudtrain-gpu-*" in findings["image"]["summary"]
    assert "ami/README.md" in findings["image"]["fix"]
    assert [c for c, f in findings.items() if f["status"] == "fail"] == ["image"]
    assert "1 check(s) failed: image" in result.stderr

    # with the image there, nothing fails: exit 0
    AwsCloud(moto_env, "us-east-1").ec2.register_image(Name="cloudtrain-gpu-20261128")
    result = cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cloudtrain-gpu-20261128 (ami-" in result.stdout
    assert "✓ ok" in result.stdout and "! warn" in result.stdout and "✗ fail" not in result.stdout


# --- keys -----------------------------------------------------------------------------------


def test_loose_key_permissions_fail_with_the_exact_chmod(settings: Settings) -> None:
    keys = settings.keys_dir
    keys.mkdir(parents=True)
    os.chmod(keys, 0o755)
    loose, tight = keys / "run-a.pem", keys / "run-b.pem"
    for key, mode in ((loose, 0o644), (tight, 0o600)):
        key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
        os.chmod(key, mode)

    finding = check_keys(settings)
    assert finding.status is Status.FAIL
    assert "run-a.pem is 644" in finding.summary and "keys is 755" in finding.summary
    assert "run-b.pem" not in finding.summary
    assert finding.fix == f"Run: chmod 700 {keys} && chmod 600 {loose}"
    assert {d["path"] for d in finding.data["loose"]} == {str(keys), str(loose)}

    # the fix, run as printed, is the whole fix
    subprocess.run(["bash", "-c", finding.fix.removeprefix("Run: ")], check=True)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    again = check_keys(settings)
    assert again.status is Status.OK and "2 private key(s) all 600" in again.summary


def test_keys_folder_absent_is_fine(settings: Settings) -> None:
    assert check_keys(settings).status is Status.OK


def test_cli_reports_loose_keys(settings: Settings, no_credentials: None) -> None:
    settings.keys_dir.mkdir(parents=True, mode=0o700)
    key = settings.keys_dir / "x.pem"
    key.write_text("k")
    os.chmod(key, 0o640)
    result = cli("doctor", "--json")
    assert result.returncode == 3
    keys = next(f for f in json.loads(result.stdout)["findings"] if f["check"] == "keys")
    assert keys["status"] == "fail" and keys["fix"] == f"Run: chmod 600 {key}"


# --- quotas (Stubber: moto has no Service Quotas for EC2) ----------------------------------


def test_quota_zero_fails_for_g_spot_and_warns_for_the_others(stubbed: tuple[AwsCloud, Stubber]) -> None:
    cloud, stubber = stubbed
    values = {"L-3819A6DF": 0.0, "L-7212CCBC": 0.0, "L-DB2E81BA": 8.0, "L-417A185B": 96.0}
    for check in QUOTA_CHECKS:
        stubber.add_response(
            "get_service_quota",
            quota_reply(check.code, QUOTA_NAMES[check.code], values[check.code]),
            expected_params={"ServiceCode": "ec2", "QuotaCode": check.code},
        )
    findings = {f.check: f for f in check_quotas(cloud, load_catalog())}
    assert {c: f.status for c, f in findings.items()} == {
        "quota.g-spot": Status.FAIL,
        "quota.p-spot": Status.WARN,
        "quota.g-on-demand": Status.OK,
        "quota.p-on-demand": Status.OK,
    }
    g_spot = findings["quota.g-spot"]
    assert "0 vCPUs" in g_spot.summary and "g4dn.xlarge" in g_spot.summary
    assert "--quota-code L-3819A6DF --desired-value 4" in (g_spot.fix or "")
    assert "--quota-code L-7212CCBC --desired-value 8" in (findings["quota.p-spot"].fix or "")
    assert findings["quota.g-on-demand"].data["value"] == 8.0


def test_quota_without_an_applied_value_reads_the_default(stubbed: tuple[AwsCloud, Stubber]) -> None:
    cloud, stubber = stubbed
    stubber.add_client_error(
        "get_service_quota", "NoSuchResourceException", "The request failed because the quota was not found."
    )
    stubber.add_response(
        "get_aws_default_service_quota",
        quota_reply("L-3819A6DF", QUOTA_NAMES["L-3819A6DF"], 64.0),
        expected_params={"ServiceCode": "ec2", "QuotaCode": "L-3819A6DF"},
    )
    quota = cloud.ec2_quota("L-3819A6DF")
    assert (quota.value, quota.applied, quota.name) == (64.0, False, "All G and VT Spot Instance Requests")


@pytest.mark.parametrize(
    ("code", "status"),
    [("AccessDeniedException", 400), ("ServiceException", 500), ("TooManyRequestsException", 429)],
)
def test_quota_api_unavailable_is_one_warning(
    stubbed: tuple[AwsCloud, Stubber], code: str, status: int
) -> None:
    cloud, stubber = stubbed
    stubber.add_client_error("get_service_quota", code, "not for you", http_status_code=status)
    findings = check_quotas(cloud, load_catalog())  # one call only: the Stubber has no other reply
    assert [(f.check, f.status) for f in findings] == [("quotas", Status.WARN)]
    assert "could not check" in findings[0].summary and "not for you" in findings[0].summary
    assert "L-3819A6DF" in (findings[0].fix or "")


def test_quota_endpoint_unreachable_is_a_warning(settings: Settings) -> None:
    cloud = AwsCloud(settings.with_(endpoint_url=CLOSED_PORT), "us-east-1", max_attempts=1)
    findings = check_quotas(cloud, load_catalog())
    assert [(f.check, f.status) for f in findings] == [("quotas", Status.WARN)]
    assert "cannot reach AWS" in findings[0].summary


def g5_plan(tmp_path: Path, nodes: int, spot: bool = True) -> Plan:
    """The plan of a job on ``nodes`` g5.12xlarge (48 vCPUs each), priced from the catalog."""
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: big\nrun: r\nkeras: 2\nresources:\n  instance_type: g5.12xlarge\n"
        f"  region: us-east-1\n  nodes: {nodes}\n  spot: {str(spot).lower()}\n"
    )
    return plan(load_job(job), load_catalog(), None, region="us-east-1", now=utcnow())


def test_a_plans_quota_counts_every_node(stubbed: tuple[AwsCloud, Stubber], tmp_path: Path) -> None:
    cloud, stubber = stubbed
    for _ in range(2):
        stubber.add_response(
            "get_service_quota",
            quota_reply("L-3819A6DF", QUOTA_NAMES["L-3819A6DF"], 64.0),
            expected_params={"ServiceCode": "ec2", "QuotaCode": "L-3819A6DF"},
        )
    one = check_plan_quota(cloud, g5_plan(tmp_path, 1))
    assert one is not None and one.status is Status.OK
    assert one.summary == "48 vCPUs of g5.12xlarge, within quota 64 (All G and VT Spot Instance Requests)"
    two = check_plan_quota(cloud, g5_plan(tmp_path, 2))
    assert two is not None and (two.check, two.status) == ("quota.job", Status.FAIL)
    assert "2 nodes × 48 vCPUs = 96 vCPUs of g5.12xlarge > quota 64" in two.summary
    assert "--quota-code L-3819A6DF --desired-value 96" in (two.fix or "")
    assert (two.data["nodes"], two.data["vcpus"]) == (2, 96)


def test_an_on_demand_plan_asks_the_on_demand_quota(
    stubbed: tuple[AwsCloud, Stubber], tmp_path: Path
) -> None:
    cloud, stubber = stubbed
    stubber.add_response(
        "get_service_quota",
        quota_reply("L-DB2E81BA", QUOTA_NAMES["L-DB2E81BA"], 96.0),
        expected_params={"ServiceCode": "ec2", "QuotaCode": "L-DB2E81BA"},
    )
    found = check_plan_quota(cloud, g5_plan(tmp_path, 2, spot=False))
    assert found is not None and found.status is Status.OK and "= 96 vCPUs" in found.summary


def test_a_plans_quota_unreadable_is_a_warning(stubbed: tuple[AwsCloud, Stubber], tmp_path: Path) -> None:
    cloud, stubber = stubbed
    stubber.add_client_error(
        "get_service_quota", "AccessDeniedException", "not for you", http_status_code=400
    )
    found = check_plan_quota(cloud, g5_plan(tmp_path, 2))
    assert found is not None and found.status is Status.WARN
    assert "could not check" in found.summary and "96 vCPUs" in found.summary


# --- region, leftovers ------------------------------------------------------------------------


def test_region_outside_the_catalog_warns() -> None:
    catalog = load_catalog()
    assert region_finding("us-east-1", "test", catalog).status is Status.OK
    outside = region_finding("af-south-1", "--region", catalog)
    assert outside.status is Status.WARN and "not in cloudtrain's price catalog" in outside.summary
    assert "us-east-1" in (outside.fix or "")


def test_leftovers_of_an_ended_run(
    cloud: AwsCloud,  # noqa: F811
    tags: dict[str, str],  # noqa: F811
    image_id: str,  # noqa: F811
) -> None:
    assert check_leftovers(cloud.settings, cloud).status is Status.OK
    instance_id = cloud.launch(launch_request(cloud, tags, image_id))
    # while the run is live, its instance and key pair are no leftovers
    with Ledger.open(cloud.settings) as ledger:
        ledger.create_run(RunRow(RUN_ID, "digits-mlp", RunState.RUNNING, utcnow() - timedelta(hours=1)))
    assert check_leftovers(cloud.settings, cloud).status is Status.OK
    with Ledger.open(cloud.settings) as ledger:
        ledger.update_run(RUN_ID, state=RunState.FAILED, ended_at=utcnow())
    finding = check_leftovers(cloud.settings.with_(simulated=False), cloud)
    assert finding.status is Status.WARN
    assert instance_id in finding.summary and f"cloudtrain-{RUN_ID}" in finding.summary
    assert finding.fix == (
        f"Run: aws ec2 terminate-instances --region us-east-1 --instance-ids {instance_id} "
        f"&& aws ec2 delete-key-pair --region us-east-1 --key-name cloudtrain-{RUN_ID}"
    )
    assert "sim stop" in (check_leftovers(cloud.settings, cloud).fix or "")  # simulated: the simulator's way
    cloud.terminate(instance_id, delay=1)
    finding = check_leftovers(cloud.settings.with_(simulated=False), cloud)
    assert finding.status is Status.WARN and finding.data["instances"] == []
    assert finding.fix == f"Run: aws ec2 delete-key-pair --region us-east-1 --key-name cloudtrain-{RUN_ID}"


# --- dry-run: the simulator and the simulated image ----------------------------------------


def fake_image(envs: dict[str, dict[str, str]]) -> Path:
    """A built simulated image as provision.sh leaves it (image.json), without the packages."""
    path = simimage.image_path()
    for name in envs:
        (path / "envs" / name).mkdir(parents=True)
        (path / "envs" / name / ".complete").touch()  # what a finished environment's build leaves
    (path / "image.json").write_text(json.dumps({"schema": 1, "flavor": "cpu", "envs": envs}))
    return path


@pytest.fixture
def image_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("CLOUDTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sim_image_not_built(image_cache: Path) -> None:
    findings = {f.check: f for f in check_sim_image()}
    assert findings["sim-image"].status is Status.WARN
    assert "not built yet" in findings["sim-image"].summary
    assert "--dry-run" in (findings["sim-image"].fix or "")


def test_sim_image_that_cannot_be_built_from_this_python_fails(
    image_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = image_cache.parent / "python"
    python.write_text(STUB_PYTHON.replace("3.10.12", "3.9.2"))  # no TensorFlow 2.21 wheel for it
    python.chmod(0o755)
    monkeypatch.setenv("CLOUDTRAIN_IMAGE_PYTHON", str(python))
    found = {f.check: f for f in check_sim_image()}["sim-image"]
    assert found.status is Status.FAIL and found.data == {"path": str(simimage.image_path()), "built": False}
    assert "cannot be built for tensorflow jobs" in found.summary and "is Python 3.9" in found.summary
    assert "CLOUDTRAIN_IMAGE_PYTHON" in (found.fix or "")


def test_sim_image_envs_and_their_pythons(image_cache: Path) -> None:
    ours = platform.python_version()
    fake_image(
        {
            "tensorflow": {"python": sys.executable, "python_version": ours},
            "theano": {"python": sys.executable, "python_version": ours},  # too new for Theano
            "broken": {"python": str(image_cache / "gone" / "python"), "python_version": "3.12.1"},
        }
    )
    findings = {f.check: f for f in check_sim_image()}
    assert findings["sim-image"].status is Status.OK
    assert "environments: broken, tensorflow, theano" in findings["sim-image"].summary
    assert findings["sim-env.tensorflow"].status is Status.OK
    assert findings["sim-env.tensorflow"].summary == f"Python {ours} ({sys.executable})"
    assert findings["sim-env.theano"].status is Status.FAIL
    assert "needs Python <= 3.8" in findings["sim-env.theano"].summary
    assert (
        findings["sim-env.broken"].status is Status.FAIL and "missing" in findings["sim-env.broken"].summary
    )
    assert "Delete" in (findings["sim-env.broken"].fix or "")


def test_python37_is_reported_when_the_image_module_can_find_it(
    image_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simimage, "find_python37", lambda: None, raising=False)
    found = {f.check: f for f in check_sim_image()}["python3.7"]
    assert found.status is Status.WARN and "no Python 3.7 found" in found.summary
    monkeypatch.setattr(simimage, "find_python37", lambda: "/opt/py37/bin/python3.7", raising=False)
    found = {f.check: f for f in check_sim_image()}["python3.7"]
    assert found.status is Status.OK and "/opt/py37/bin/python3.7" in found.summary


def test_cli_dry_run_starts_the_simulator_and_lists_the_environments(image_cache: Path) -> None:
    fake_image({"tensorflow": {"python": sys.executable, "python_version": platform.python_version()}})
    result = cli("doctor", "--dry-run", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["simulated"] is True and data["ok"] is True
    found = {f["check"]: f for f in data["findings"]}
    assert found["simulator"]["status"] == "ok"
    assert found["simulator"]["data"]["endpoint"].startswith("http://127.0.0.1:")
    assert found["credentials"]["data"]["source"] == "simulated"
    assert found["image"]["status"] == "ok" and found["image"]["data"]["name"] == "cloudtrain-gpu-simulated"
    assert found["quotas"]["status"] == "warn" and "dry-runs" in found["quotas"]["fix"]
    assert found["sim-env.tensorflow"]["data"]["python_version"] == platform.python_version()

    result = cli("doctor", "--dry-run")  # reuses the running simulator
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "environment tensorflow" in result.stdout and f"Python {platform.python_version()}" in result.stdout
    )


def test_help_explains_each_check() -> None:
    result = cli("doctor", "--help")
    assert result.returncode == 0
    for word in ("credentials", "region", "keys", "quotas", "image", "leftovers", "simulator", "sim-image"):
        assert f"  {word}" in result.stdout + result.stderr
