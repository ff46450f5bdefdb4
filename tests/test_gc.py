"""`cloudtrain gc` against moto: what a run leaves is found by its tags and removed when its
run finished or expired; another owner's, and a live run's, never."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner, Result
from moto import mock_aws

from cloudtrain.cli import main
from cloudtrain.cloud.aws import AwsCloud, LaunchRequest, run_tags
from cloudtrain.cloud.simulator import patched_moto
from cloudtrain.errors import CloudError, ExitCode
from cloudtrain.gc import verdict
from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.records import Lifecycle, RunHandle, RunState, iso, utcnow
from cloudtrain.settings import Settings
from cloudtrain.teardown import teardown

OWNER = "tester@testhost"  # conftest's CLOUDTRAIN_OWNER
TEAMMATE = "teammate@elsewhere"
CIDR = "203.0.113.7/32"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@dataclass(frozen=True)
class Left:
    """What a run left in one region."""

    run_id: str
    region: str
    instance: str
    group: str
    key: str
    volume: str | None = None  # a detached volume besides the root volume
    profile: str | None = None
    spot_request: str | None = None
    placement_group: str | None = None  # a cluster's
    nodes: tuple[str, ...] = ()  # a cluster's instances (``instance``: the first)


_CLOUDS: dict[tuple[Settings, str], AwsCloud] = {}


def cloud_in(settings: Settings, region: str) -> AwsCloud:
    """One client per region and test (making a boto3 client costs a good part of a second)."""
    if (settings, region) not in _CLOUDS:
        _CLOUDS[settings, region] = AwsCloud(settings, region)
    return _CLOUDS[settings, region]


@pytest.fixture
def aws(settings: Settings) -> Iterator[None]:
    """In-process moto, as the simulator completes it (placement groups), with the cloudtrain
    image in the regions the tests use."""
    with patched_moto(), mock_aws():
        for region in ("us-east-1", "eu-west-1"):
            cloud_in(settings, region).ec2.register_image(Name="cloudtrain-gpu-20261128")
        yield
    _CLOUDS.clear()


def leave(
    settings: Settings,
    run_id: str,
    *,
    owner: str = OWNER,
    expires: datetime | None = None,
    region: str = "us-east-1",
    volume: bool = False,
    profile: bool = False,
    spot_request: bool = False,
    nodes: int = 0,
) -> Left:
    """Make what a run makes, tagged as a run tags it (the same AwsCloud calls); ``nodes``:
    a cluster of that many instances, in a placement group."""
    cloud = cloud_in(settings, region)
    tags = run_tags(run_id, owner, expires or utcnow() + timedelta(hours=5))
    key = cloud.ensure_key_pair(run_id, tags)
    group = cloud.create_security_group(run_id, CIDR, tags, cluster=nodes > 0)
    name = cloud.ensure_instance_profile(run_id, ["data-bucket"], tags) if profile else None
    request = LaunchRequest(
        run_id=run_id,
        instance_type="g4dn.xlarge",
        zone=None,
        spot=True,
        max_price=None,
        disk_gb=50,
        image=cloud.resolve_image(None),
        key=key,
        security_group_id=group,
        client_token=f"{run_id}-1",
        tags=tags,
        instance_profile=name,
        placement_group=cloud.create_placement_group(run_id, tags) if nodes else None,
    )
    cluster = tuple(cloud.launch_cluster(request, nodes)) if nodes else ()
    instance = cluster[0] if cluster else cloud.launch(request)
    spec = [{"Key": k, "Value": v} for k, v in tags.items()]
    volume_id = request_id = None
    if volume:
        volume_id = cloud.ec2.create_volume(
            Size=10,
            AvailabilityZone=f"{region}a",
            TagSpecifications=[{"ResourceType": "volume", "Tags": spec}],
        )["VolumeId"]
    if spot_request:
        request_id = cloud.ec2.request_spot_instances(
            InstanceCount=1,
            LaunchSpecification={"ImageId": cloud.resolve_image(None).id, "InstanceType": "g4dn.xlarge"},
            TagSpecifications=[{"ResourceType": "spot-instances-request", "Tags": spec}],
        )["SpotInstanceRequests"][0]["SpotInstanceRequestId"]
    return Left(
        run_id,
        region,
        instance,
        group,
        key.name,
        volume_id,
        name,
        request_id,
        request.placement_group,
        cluster,
    )


def record(
    settings: Settings, left: Left, state: RunState, *, simulated: bool = False, **handle: Any
) -> None:
    """The ledger's view of the run: its row and its instance (not terminated)."""
    with Ledger.open(settings) as ledger:
        ledger.create_run(
            RunRow(
                left.run_id,
                left.run_id.rsplit("-", 3)[0],
                state,
                utcnow() - timedelta(hours=1),
                simulated=simulated,
                region=left.region,
                handle=RunHandle(instance_id=left.instance, security_group_id=left.group, **handle),
            )
        )
        ledger.record_instance(
            InstanceRow(
                left.instance,
                left.run_id,
                "g4dn.xlarge",
                None,
                Lifecycle.SPOT,
                0.2,
                0.5,
                utcnow() - timedelta(hours=1),
                running_at=utcnow() - timedelta(hours=1),
            )
        )


# --- what the cloud still has -----------------------------------------------------------


def instance_state(settings: Settings, left: Left) -> str:
    ec2 = cloud_in(settings, left.region).ec2
    return str(
        ec2.describe_instances(InstanceIds=[left.instance])["Reservations"][0]["Instances"][0]["State"][
            "Name"
        ]
    )


def group_exists(settings: Settings, left: Left) -> bool:
    ec2 = cloud_in(settings, left.region).ec2
    found = ec2.describe_security_groups(Filters=[{"Name": "group-id", "Values": [left.group]}])
    return bool(found["SecurityGroups"])


def key_exists(settings: Settings, left: Left) -> bool:
    ec2 = cloud_in(settings, left.region).ec2
    return bool(ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [left.key]}])["KeyPairs"])


def volume_exists(settings: Settings, left: Left) -> bool:
    ec2 = cloud_in(settings, left.region).ec2
    return bool(ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [left.volume]}])["Volumes"])


def placement_group_exists(settings: Settings, left: Left) -> bool:
    ec2 = cloud_in(settings, left.region).ec2
    found = ec2.describe_placement_groups(Filters=[{"Name": "group-name", "Values": [left.placement_group]}])
    return bool(found["PlacementGroups"])


def profile_exists(settings: Settings, left: Left) -> bool:
    iam = cloud_in(settings, left.region).iam
    try:
        iam.get_instance_profile(InstanceProfileName=left.profile)
    except ClientError:
        try:
            iam.get_role(RoleName=left.profile)
        except ClientError:
            return False
    return True


def spot_state(settings: Settings, left: Left) -> str:
    ec2 = cloud_in(settings, left.region).ec2
    reply = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[left.spot_request])
    return str(reply["SpotInstanceRequests"][0]["State"]) if reply["SpotInstanceRequests"] else "gone"


def untouched(settings: Settings, left: Left) -> None:
    assert instance_state(settings, left) == "running"
    assert group_exists(settings, left) and key_exists(settings, left)
    if left.profile:
        assert profile_exists(settings, left)
    if left.volume:
        assert volume_exists(settings, left)
    if left.spot_request:
        assert spot_state(settings, left) in ("open", "active")
    assert (settings.keys_dir / f"{left.run_id}.pem").exists()


def removed(settings: Settings, left: Left) -> None:
    assert instance_state(settings, left) == "terminated"
    assert not group_exists(settings, left) and not key_exists(settings, left)
    if left.profile:
        assert not profile_exists(settings, left)
    if left.volume:
        assert not volume_exists(settings, left)
    if left.spot_request:
        assert spot_state(settings, left) in ("cancelled", "gone")  # moto forgets a cancelled one
    assert not (settings.keys_dir / f"{left.run_id}.pem").exists()


def statuses(data: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(r["kind"], r["id"]): r["status"] for r in data["resources"]}


# --- the rules ----------------------------------------------------------------------------


def _run(state: RunState, **handle: Any) -> RunRow:
    return RunRow("r-20261128-120000-abcd", "r", state, utcnow(), handle=RunHandle(**handle))


@pytest.mark.parametrize(
    ("expires_in_h", "run", "garbage", "why"),
    [
        (5, _run(RunState.SUCCEEDED), True, "run succeeded"),
        (5, _run(RunState.CANCELLED, kept_until="2000-01-01T00:00:00Z"), True, "run cancelled"),
        (-1, None, True, "expired"),  # the ledger does not know the run: expiry alone decides
        (-1, _run(RunState.RUNNING), True, "expired"),
        (5, None, False, "run not in this ledger, expires"),
        (5, _run(RunState.RUNNING), False, "live run (running), expires"),
        (-1, _run(RunState.SUCCEEDED, kept_until=iso(utcnow() + timedelta(hours=2))), False, "kept until"),
        (None, None, False, "no expiry tag"),
    ],
)
def test_verdict(expires_in_h: int | None, run: RunRow | None, garbage: bool, why: str) -> None:
    now = utcnow()
    tags = {} if expires_in_h is None else {"cloudtrain:expires": iso(now + timedelta(hours=expires_in_h))}
    assert verdict(tags, run, now)[0] is garbage
    assert why in verdict(tags, run, now)[1]
    assert verdict({"cloudtrain:expires": "not a date"}, None, now)[0] is False


@pytest.mark.parametrize("spot", [True, False])
def test_a_spot_launch_tags_its_spot_request(aws: None, settings: Settings, spot: bool) -> None:
    """moto makes no spot request for a spot run_instances: check what is sent to EC2."""
    from urllib.parse import parse_qs

    cloud = cloud_in(settings, "us-east-1")
    sent: list[dict[str, list[str]]] = []

    def note(request: Any, **_: Any) -> None:
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        sent.append(parse_qs(body))

    cloud.ec2.meta.events.register("before-send.ec2.RunInstances", note)
    tags = run_tags("tag-20261128-120000-aaaa", OWNER, utcnow() + timedelta(hours=1))
    cloud.launch(
        LaunchRequest(
            run_id="tag-20261128-120000-aaaa",
            instance_type="g4dn.xlarge",
            zone=None,
            spot=spot,
            max_price=None,
            disk_gb=50,
            image=cloud.resolve_image(None),
            key=cloud.ensure_key_pair("tag-20261128-120000-aaaa", tags),
            security_group_id=cloud.create_security_group("tag-20261128-120000-aaaa", CIDR, tags),
            client_token="tag-1",
            tags=tags,
        )
    )
    [body] = sent
    kinds = [
        v[0] for k, v in body.items() if k.startswith("TagSpecification.") and k.endswith(".ResourceType")
    ]
    assert sorted(kinds) == sorted(["instance", "volume", *(["spot-instances-request"] if spot else [])])


# --- the command ------------------------------------------------------------------------


def test_finished_runs_leftovers_go_and_nothing_else(aws: None, settings: Settings) -> None:
    done = leave(settings, "done-20261128-120000-aaaa", volume=True, profile=True, spot_request=True)
    record(settings, done, RunState.SUCCEEDED)
    live = leave(settings, "live-20261128-120000-bbbb", profile=True)  # a run in another terminal
    record(settings, live, RunState.RUNNING)
    kept = leave(settings, "kept-20261128-120000-cccc", expires=utcnow() - timedelta(minutes=1))
    record(settings, kept, RunState.SUCCEEDED, kept_until=iso(utcnow() + timedelta(hours=3)))
    # not in this ledger: a second laptop's CLOUDTRAIN_HOME, a concurrent test
    elsewhere = leave(settings, "else-20261128-120000-dddd")
    teammate = leave(
        settings,
        "mate-20261128-120000-eeee",
        owner=TEAMMATE,
        expires=utcnow() - timedelta(days=3),
        profile=True,
    )

    result = cli("gc", "--yes", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == 1 and data["owner"] == OWNER and data["simulated"] is False
    assert data["regions"] == ["us-east-1"]
    found = statuses(data)
    mine = {(r["kind"], r["id"]): r["status"] for r in data["resources"] if r["run_id"] == done.run_id}
    assert set(mine.values()) == {"removed"}
    assert {
        ("instance", done.instance),
        ("volume", done.volume),
        ("security-group", done.group),
        ("key-pair", done.key),
        ("instance-profile", done.profile),
        ("spot-request", done.spot_request),
    } <= set(mine)
    assert data["failed"] == 0 and data["removed"] == len(mine) == data["garbage"]
    others = [r for r in data["resources"] if r["run_id"] != done.run_id]
    assert {r["status"] for r in others} == {"kept"} and data["kept"] == len(others)
    for left in (live, kept, elsewhere):
        assert found[("instance", left.instance)] == "kept"
    assert not any(r["run_id"] == teammate.run_id for r in data["resources"])  # never even listed

    removed(settings, done)
    for left in (live, kept, elsewhere, teammate):
        untouched(settings, left)
    with Ledger.open(settings) as ledger:
        [instance] = ledger.instances(done.run_id)
        assert instance.terminated_at is not None
        kinds = [e.kind for e in ledger.events(done.run_id)]
        assert "terminated" in kinds and kinds[-1] == "gc"
        run = ledger.get_run(live.run_id)
        assert run is not None and run.state is RunState.RUNNING
        assert ledger.events(live.run_id) == []


def test_removal_order_instances_before_what_they_use(aws: None, settings: Settings) -> None:
    from cloudtrain.api import remove_garbage, survey_garbage
    from cloudtrain.progress import Reporter

    done = leave(settings, "done-20261128-120000-aaaa", volume=True, profile=True, spot_request=True)
    record(settings, done, RunState.FAILED)
    said: list[str] = []

    class Notes(Reporter):
        def info(self, message: str) -> None:
            said.append(message.split()[1])

    found = survey_garbage(settings)
    kinds = [g.kind for g in found.garbage]
    assert kinds[-1] == "instance-profile" and found.garbage[-1].region == "global"
    remove_garbage(settings, found, reporter=Notes())
    first = {kind: said.index(kind) for kind in said}
    assert first["spot-request"] < first["instance"] < first["volume"] < first["security-group"]
    assert first["security-group"] < first["instance-profile"]


def test_a_clusters_placement_group_goes_after_all_its_nodes(aws: None, settings: Settings) -> None:
    """Found by its tags like the rest; removed once no node of its run is left (AWS refuses
    to delete a group an instance is in), and a live cluster's stays."""
    from cloudtrain.api import remove_garbage, survey_garbage
    from cloudtrain.progress import Reporter

    done = leave(settings, "done-20261128-120000-aaaa", nodes=2)
    record(settings, done, RunState.SUCCEEDED)
    live = leave(settings, "live-20261128-120000-bbbb", nodes=2)
    record(settings, live, RunState.RUNNING)
    said: list[str] = []

    class Notes(Reporter):
        def info(self, message: str) -> None:
            said.append(message)

    found = survey_garbage(settings)
    garbage = {(g.kind, g.id) for g in found.garbage}
    assert {("instance", node) for node in done.nodes} | {
        ("placement-group", done.placement_group)
    } <= garbage
    assert ("placement-group", live.placement_group) in {(k.kind, k.id) for k in found.kept}
    result = remove_garbage(settings, found, reporter=Notes())
    assert result.failed == []
    removals = [line.split()[1:3] for line in said]
    assert removals.index(["placement-group", done.placement_group]) > max(
        removals.index(["instance", node]) for node in done.nodes
    )
    assert not placement_group_exists(settings, done)
    assert {instance_state(settings, replace(done, instance=node)) for node in done.nodes} == {"terminated"}
    removed(settings, done)
    assert placement_group_exists(settings, live)
    untouched(settings, live)


def test_expired_leftovers_go_even_with_the_ledger_deleted(aws: None, settings: Settings) -> None:
    old = leave(settings, "old-20261128-120000-aaaa", expires=utcnow() - timedelta(hours=1), profile=True)
    record(settings, old, RunState.RUNNING)
    fresh = leave(settings, "new-20261128-120000-bbbb")
    record(settings, fresh, RunState.RUNNING)
    settings.ledger_path.unlink()

    result = cli("gc", "--yes")
    assert result.exit_code == 0, result.output
    assert "expired" in result.stdout and old.instance in result.stdout
    assert "removed 5 of 5 resource(s)" in result.stderr  # instance, root volume, group, key, profile
    removed(settings, old)
    untouched(settings, fresh)  # unknown now, but not expired: someone's live run


def test_without_yes_and_without_a_terminal_nothing_is_removed(aws: None, settings: Settings) -> None:
    done = leave(settings, "done-20261128-120000-aaaa", profile=True)
    record(settings, done, RunState.SUCCEEDED)

    result = cli("gc")
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert "refusing to remove" in result.stderr and "--yes" in result.stderr
    assert done.instance in result.stdout and "run succeeded" in result.stdout  # listed first

    result = cli("gc", "--json")
    assert result.exit_code == ExitCode.INVALID_INPUT
    data = json.loads(result.stdout)
    assert data["removed"] == 0 and statuses(data)[("instance", done.instance)] == "garbage"
    untouched(settings, done)


def on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cli module's sys, with a terminal on stdin (so it asks before spending)."""
    import sys

    class Terminal:
        def __getattr__(self, name: str) -> Any:
            return getattr(sys, name)

        class stdin:  # noqa: N801
            @staticmethod
            def isatty() -> bool:
                return True

    monkeypatch.setattr("cloudtrain.cli.sys", Terminal())


def test_declined_at_the_prompt_nothing_is_removed(
    aws: None, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = leave(settings, "done-20261128-120000-aaaa")
    record(settings, done, RunState.SUCCEEDED)
    on_a_terminal(monkeypatch)
    result = CliRunner().invoke(main, ["gc"], input="n\n", catch_exceptions=False)
    assert result.exit_code == 0 and "nothing removed" in result.stderr
    untouched(settings, done)


def test_a_run_declined_at_the_prompt_launches_nothing_and_exits_2(
    aws: None, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: declined\nrun: python train.py\nresources: {gpu: T4}\n")
    on_a_terminal(monkeypatch)
    result = CliRunner().invoke(main, ["run", str(job)], input="n\n", catch_exceptions=False)
    assert result.exit_code == 2 and "Launch it and start paying?" in result.stderr
    assert "not launched: the plan was declined" in result.stderr
    cloud = cloud_in(settings, "us-east-1")
    assert cloud.ec2.describe_instances()["Reservations"] == []
    with Ledger.open(settings) as ledger:
        assert ledger.list_runs() == []


def test_active_set_only_after_termination_is_confirmed(
    aws: None, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expired run the ledger still calls running: cancelled only once describe_instances
    confirms its instance terminated; until then its group and profile stay too."""
    stale = leave(settings, "stale-20261128-120000-aaaa", expires=utcnow() - timedelta(hours=1), profile=True)
    record(settings, stale, RunState.RUNNING)
    terminate = AwsCloud.terminate

    def stuck(self: AwsCloud, instance_id: str, delay: int = 5, max_attempts: int = 120) -> datetime:
        accepted = {"TerminatingInstances": [{"InstanceId": instance_id}]}
        self.ec2.terminate_instances = lambda **_: accepted  # AWS accepts, the instance never goes
        return terminate(self, instance_id, delay=1, max_attempts=1)

    monkeypatch.setattr(AwsCloud, "terminate", stuck)
    result = cli("gc", "--yes")
    assert result.exit_code == ExitCode.CLOUD_OR_REMOTE
    assert f"instance {stale.instance}" in result.stderr and "not confirmed terminated" in result.stderr
    assert instance_state(settings, stale) == "running"
    assert group_exists(settings, stale) and profile_exists(settings, stale)
    with Ledger.open(settings) as ledger:
        assert [r.id for r in ledger.list_runs(active_only=True)] == [stale.run_id]
        assert ledger.instances(stale.run_id)[0].terminated_at is None
        assert "teardown-incomplete" in [e.kind for e in ledger.events(stale.run_id)]
        assert stale.run_id in ledger.runs_left_behind()

    monkeypatch.setattr(AwsCloud, "terminate", terminate)
    result = cli("gc", "--yes")
    assert result.exit_code == 0, result.output
    removed(settings, stale)
    with Ledger.open(settings) as ledger:
        assert ledger.list_runs(active_only=True) == []
        run = ledger.get_run(stale.run_id)
        assert run is not None and run.state is RunState.CANCELLED and run.ended_at is not None
        assert ledger.instances(stale.run_id)[0].terminated_at is not None
        assert stale.run_id not in ledger.runs_left_behind()  # `down --all` has nothing to retry


def test_an_instance_gc_cannot_see_keeps_the_run_active(aws: None, settings: Settings) -> None:
    """The run's own tag still finds an instance (one without the owner tag, which gc never
    removes): what gc may remove goes, but the run stays active."""
    stale = leave(settings, "stale-20261128-120000-aaaa", expires=utcnow() - timedelta(hours=1))
    record(settings, stale, RunState.RUNNING)
    ec2 = cloud_in(settings, "us-east-1").ec2
    ec2.delete_tags(Resources=[stale.instance], Tags=[{"Key": "cloudtrain:owner"}])

    result = cli("gc", "--yes")
    assert result.exit_code == ExitCode.CLOUD_OR_REMOTE
    assert f"its run's instance {stale.instance} (running) is still there" in result.stderr
    assert instance_state(settings, stale) == "running"
    assert group_exists(settings, stale) and not key_exists(settings, stale)  # the key pair is not in use
    with Ledger.open(settings) as ledger:
        assert [r.id for r in ledger.list_runs(active_only=True)] == [stale.run_id]
        assert ledger.events(stale.run_id)[-1].kind == "teardown-incomplete"


def test_other_regions_only_with_all_regions(aws: None, settings: Settings) -> None:
    far = leave(settings, "far-20261128-120000-aaaa", region="eu-west-1", profile=True)
    record(settings, far, RunState.SUCCEEDED)

    data = json.loads(cli("gc", "--yes", "--json").stdout)
    assert data["regions"] == ["us-east-1"] and data["removed"] == 0
    # its profile goes with its instances, from the region they are in
    assert statuses(data) == {("instance-profile", far.profile): "kept"}
    untouched(settings, far)

    data = json.loads(cli("gc", "--yes", "--json", "--all-regions").stdout)
    assert "eu-west-1" in data["regions"] and "us-east-1" in data["regions"]
    assert statuses(data)[("instance", far.instance)] == "removed"
    removed(settings, far)


def test_nothing_to_remove(aws: None, settings: Settings) -> None:
    result = cli("gc")
    assert result.exit_code == 0
    assert f"nothing to remove for {OWNER} in us-east-1" in result.stdout


def test_dry_run_collects_in_the_simulated_cloud(settings: Settings) -> None:
    from cloudtrain.cloud.simulator import ensure_simulator

    sim = ensure_simulator(settings)
    cloud = AwsCloud(sim, "us-east-1")
    tags = run_tags("sim-20261128-120000-aaaa", OWNER, utcnow() - timedelta(hours=1))
    key = cloud.ensure_key_pair("sim-20261128-120000-aaaa", tags)
    group = cloud.create_security_group("sim-20261128-120000-aaaa", CIDR, tags)

    result = cli("gc", "--dry-run", "--yes", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["simulated"] is True
    assert statuses(data) == {("security-group", group): "removed", ("key-pair", key.name): "removed"}
    assert (
        cloud.ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [key.name]}])["KeyPairs"] == []
    )
    assert "--dry-run" in cli("gc", "--help").stdout


# --- two owners, one run id; --keep's expiry -----------------------------------------------


def test_two_owners_with_one_run_id_never_touch_each_others_resources(aws: None, settings: Settings) -> None:
    """Same name, same second, same 4 hex digits: the teammate's run must come to no harm."""
    theirs = leave(settings, "same-20261128-120000-abcd", owner=TEAMMATE, profile=True)
    cloud = AwsCloud(settings, "us-east-1")  # this owner's controller (not the one that launched theirs)
    tags = run_tags(theirs.run_id, OWNER, utcnow() + timedelta(hours=5))
    for make in (
        lambda: cloud.ensure_key_pair(theirs.run_id, tags),
        lambda: cloud.create_security_group(theirs.run_id, CIDR, tags),
        lambda: cloud.ensure_instance_profile(theirs.run_id, ["data-bucket"], tags),
    ):
        with pytest.raises(CloudError, match="already exists and is not this run's"):
            make()
    assert cloud.find_run_instances(theirs.run_id) == []
    assert cloud.owned_resources(OWNER, theirs.run_id) == []
    with Ledger.open(settings) as ledger:
        ledger.create_run(RunRow(theirs.run_id, "same", RunState.FAILED, utcnow()))
        assert teardown(cloud, ledger, theirs.run_id, RunHandle()) == []  # this owner's: none
    assert instance_state(settings, theirs) == "running"
    assert (
        group_exists(settings, theirs) and key_exists(settings, theirs) and profile_exists(settings, theirs)
    )
    # the teammate's own relaunch still reuses them
    mine_again = run_tags(theirs.run_id, TEAMMATE, utcnow() + timedelta(hours=5))
    assert cloud.ensure_key_pair(theirs.run_id, mine_again).name == theirs.key
    assert cloud.ensure_instance_profile(theirs.run_id, ["data-bucket"], mine_again) == theirs.profile


def test_keep_moves_the_expiry_of_every_resource_of_the_run(aws: None, settings: Settings) -> None:
    """`gc` from another home goes by the tags alone: a kept run's key pair, group and profile
    must last as long as its instance."""
    kept = leave(settings, "kept-20261128-120000-aaaa", expires=utcnow() - timedelta(minutes=5), profile=True)
    cloud = cloud_in(settings, "us-east-1")
    cloud.set_run_expiry(kept.run_id, utcnow() + timedelta(hours=24), kept.profile)
    result = cli("gc", "--yes", "--json")  # no ledger row: the tags decide
    assert result.exit_code == 0, result.output
    assert {
        kind for (kind, _), status in statuses(json.loads(result.stdout)).items() if status != "kept"
    } == set()
    untouched(settings, kept)
