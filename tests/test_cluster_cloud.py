"""The cloud layer of a cluster (#17): N instances from one RunInstances, in a placement group,
behind a security group open among its members; against the simulated AWS in this process
(moto has no placement groups: the simulator answers those calls itself)."""

from __future__ import annotations

import copy
import dataclasses
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from test_hardening import call_in_flight

from cloudtrain.cloud.aws import TAG_EXPIRES, TAG_OWNER, TAG_RUN_ID, AwsCloud, LaunchRequest, run_tags
from cloudtrain.cloud.simulator import simulated_aws
from cloudtrain.errors import CapacityError, CloudError
from cloudtrain.ledger import Ledger
from cloudtrain.records import RunHandle, iso, utcnow
from cloudtrain.settings import Settings
from cloudtrain.teardown import teardown

RUN_ID = "two-nodes-20261207-120000-abcd"
OWNER = "tester@testhost"  # conftest's CLOUDTRAIN_OWNER
CIDR = "203.0.113.7/32"


@pytest.fixture
def cloud(settings: Settings) -> Iterator[AwsCloud]:
    with simulated_aws(settings) as sim:
        cloud = AwsCloud(sim, "us-east-1")
        cloud.ec2.register_image(Name="cloudtrain-gpu-20261207")
        yield cloud


@pytest.fixture
def tags() -> dict[str, str]:
    return run_tags(RUN_ID, OWNER, utcnow() + timedelta(hours=5))


def cluster_request(cloud: AwsCloud, tags: dict[str, str], **changes: Any) -> LaunchRequest:
    """What the orchestrator asks for a cluster: key pair, cluster group, placement group."""
    fields: dict[str, Any] = dict(
        run_id=RUN_ID,
        instance_type="g4dn.xlarge",
        zone="us-east-1b",
        spot=True,
        max_price=None,
        disk_gb=50,
        image=cloud.resolve_image(None),
        key=cloud.ensure_key_pair(RUN_ID, tags),
        security_group_id=cloud.create_security_group(RUN_ID, CIDR, tags, cluster=True),
        client_token=f"{RUN_ID}-1",
        tags=tags,
        placement_group=cloud.create_placement_group(RUN_ID, tags),
    )
    fields.update(changes)
    return LaunchRequest(**fields)


def described(cloud: AwsCloud) -> list[dict[str, Any]]:
    return [r for r in cloud.ec2.describe_instances()["Reservations"]]


def placement_groups(cloud: AwsCloud) -> dict[str, dict[str, Any]]:
    return {g["GroupName"]: g for g in cloud.ec2.describe_placement_groups()["PlacementGroups"]}


def test_a_cluster_is_one_reservation_in_its_placement_group_and_zone(
    cloud: AwsCloud, tags: dict[str, str]
) -> None:
    request = cluster_request(cloud, tags)
    assert request.placement_group == f"cloudtrain-{RUN_ID}"
    sent: list[dict[str, Any]] = []
    cloud.ec2.meta.events.register(
        "provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(copy.deepcopy(params))
    )
    ids = cloud.launch_cluster(request, 3)
    assert len(sent) == 1 and (sent[0]["MinCount"], sent[0]["MaxCount"]) == (3, 3)  # all or none
    assert sent[0]["Placement"] == {"AvailabilityZone": "us-east-1b", "GroupName": request.placement_group}
    assert sent[0]["MetadataOptions"]["HttpTokens"] == "required"  # as hardened as one instance
    [reservation] = described(cloud)
    by_index = sorted(reservation["Instances"], key=lambda i: i["AmiLaunchIndex"])
    assert ids == [i["InstanceId"] for i in by_index]  # launch order: the first is the chief
    for data in by_index:
        assert data["Placement"]["GroupName"] == request.placement_group
        assert data["Placement"]["AvailabilityZone"] == "us-east-1b"
        assert data["InstanceLifecycle"] == "spot"
        assert {t["Key"]: t["Value"] for t in data["Tags"]} == tags
    # each its own loopback address: the private IP the other nodes reach it at (never 10.x)
    privates = [cloud.describe(i).private_ip for i in ids]
    assert privates == [i["PrivateIpAddress"] for i in by_index]
    assert len(set(privates)) == 3 and all(p and p.startswith("127.0.0.") for p in privates)
    assert "127.0.0.1" not in privates  # the simulator's own
    assert {i.id for i in cloud.find_run_instances(RUN_ID)} == set(ids)
    assert cloud.launch_cluster(request, 3) == ids  # a retry with the same token: the same three
    assert len(described(cloud)) == 1


def test_a_single_launch_names_no_placement_group(cloud: AwsCloud, tags: dict[str, str]) -> None:
    sent: list[dict[str, Any]] = []
    cloud.ec2.meta.events.register(
        "provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(copy.deepcopy(params))
    )
    instance_id = cloud.launch(cluster_request(cloud, tags, placement_group=None))
    assert sent[0]["Placement"] == {"AvailabilityZone": "us-east-1b"}
    assert (sent[0]["MinCount"], sent[0]["MaxCount"]) == (1, 1)
    assert cloud.describe(instance_id).private_ip == "127.0.0.2"


def test_fewer_instances_than_asked_are_terminated_and_a_capacity_error(
    cloud: AwsCloud, tags: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MinCount makes EC2 launch all or none; should it ever answer with fewer, none is kept."""
    request = cluster_request(cloud, tags)
    run_instances = cloud._run_instances

    def short(params: dict[str, Any]) -> Any:
        reply = run_instances(params)
        return {**reply, "Instances": reply["Instances"][:1]}

    monkeypatch.setattr(cloud, "_run_instances", short)
    with pytest.raises(CapacityError, match="launched 1 of the 2") as info:
        cloud.launch_cluster(request, 2)
    assert "fewer nodes" in (info.value.hint or "")
    [reservation] = described(cloud)
    states = {i["InstanceId"]: i["State"]["Name"] for i in reservation["Instances"]}
    first = min(reservation["Instances"], key=lambda i: i["AmiLaunchIndex"])["InstanceId"]
    assert states[first] == "terminated"
    # the one the answer left out is the run's all the same: teardown finds it by its tag
    with Ledger.open(cloud.settings) as ledger:
        assert teardown(cloud, ledger, RUN_ID, RunHandle()) == []
    assert cloud.find_run_instances(RUN_ID) == []
    with pytest.raises(ValueError, match="at least one"):
        cloud.launch_cluster(request, 0)


def test_an_unknown_placement_group_is_refused_as_on_aws(cloud: AwsCloud, tags: dict[str, str]) -> None:
    request = cluster_request(cloud, tags, placement_group="cloudtrain-no-such-group")
    with pytest.raises(CloudError, match="InvalidPlacementGroup.Unknown"):
        cloud.launch_cluster(request, 2)
    assert described(cloud) == []


def test_the_placement_group_is_tagged_listed_reused_and_deleted(
    cloud: AwsCloud, tags: dict[str, str]
) -> None:
    name = cloud.create_placement_group(RUN_ID, tags)
    group = placement_groups(cloud)[name]
    assert group["Strategy"] == "cluster" and group["State"] == "available"
    assert group["GroupId"].startswith("pg-")
    assert {t["Key"]: t["Value"] for t in group["Tags"]} == tags
    listed = [r for r in cloud.owned_resources(OWNER, RUN_ID) if r.kind == "placement-group"]
    assert [(r.id, r.run_id, r.owner) for r in listed] == [(name, RUN_ID, OWNER)]
    assert cloud.owned_resources("someone-else", RUN_ID) == []  # a run id alone is no filter
    assert cloud.owned_resources(OWNER, "other-20261207-120000-beef") == []

    assert cloud.create_placement_group(RUN_ID, tags) == name  # a relaunch: the run's own, again
    assert len(placement_groups(cloud)) == 1
    theirs = run_tags(RUN_ID, "teammate@elsewhere", utcnow() + timedelta(hours=5))
    with pytest.raises(CloudError, match="already exists and is not this run's"):
        cloud.create_placement_group(RUN_ID, theirs)

    later = utcnow() + timedelta(hours=24)
    cloud.set_run_expiry(RUN_ID, later)  # --keep: gc judges the group by this tag too
    assert {t["Key"]: t["Value"] for t in placement_groups(cloud)[name]["Tags"]}[TAG_EXPIRES] == iso(later)

    ids = cloud.launch_cluster(cluster_request(cloud, tags), 2)
    with pytest.raises(CloudError, match="InvalidPlacementGroup.InUse"):
        cloud.delete_placement_group(name, attempts=1)  # not while an instance is in it
    for instance_id in ids:
        cloud.terminate(instance_id, delay=1)
    cloud.delete_placement_group(name)
    assert placement_groups(cloud) == {}
    assert (
        cloud.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [group["GroupId"]]}])["Tags"] == []
    )
    cloud.delete_placement_group(name)  # already gone: no error


def test_describe_placement_groups_filters_by_tag_and_name(cloud: AwsCloud, tags: dict[str, str]) -> None:
    mine = cloud.create_placement_group(RUN_ID, tags)
    other = "other-20261207-120000-beef"
    theirs = cloud.create_placement_group(other, run_tags(other, "teammate@elsewhere", utcnow()))

    def names(**kwargs: Any) -> list[str]:
        return sorted(
            g["GroupName"] for g in cloud.ec2.describe_placement_groups(**kwargs)["PlacementGroups"]
        )

    assert names() == sorted([mine, theirs])
    assert names(Filters=[{"Name": f"tag:{TAG_OWNER}", "Values": [OWNER]}]) == [mine]
    assert names(Filters=[{"Name": f"tag:{TAG_RUN_ID}", "Values": ["other-*"]}]) == [theirs]
    assert names(Filters=[{"Name": "tag-key", "Values": [TAG_RUN_ID]}]) == sorted([mine, theirs])
    assert names(Filters=[{"Name": "strategy", "Values": ["spread"]}]) == []
    assert names(GroupNames=[theirs]) == [theirs]
    with pytest.raises(Exception, match="InvalidPlacementGroup.Unknown"):
        cloud.ec2.describe_placement_groups(GroupNames=["cloudtrain-nothing"])


def test_a_cluster_group_admits_its_own_members_and_nothing_else(
    cloud: AwsCloud, tags: dict[str, str]
) -> None:
    """moto records the rules but does not enforce them: what matters is what AWS is told."""
    group_id = cloud.create_security_group(RUN_ID, CIDR, tags, cluster=True)
    [group] = cloud.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    rules = sorted(group["IpPermissions"], key=lambda p: p["IpProtocol"])
    assert [
        (p["IpProtocol"], [g["GroupId"] for g in p["UserIdGroupPairs"]], p["IpRanges"]) for p in rules
    ] == [
        ("-1", [group_id], []),  # all traffic, from the group's members only
        ("tcp", [], [{"CidrIp": CIDR, "Description": "cloudtrain controller"}]),
    ]
    assert (rules[1]["FromPort"], rules[1]["ToPort"]) == (22, 22)

    single = cloud.create_security_group("one-node-20261207-120000-abcd", CIDR, tags)
    [plain] = cloud.ec2.describe_security_groups(GroupIds=[single])["SecurityGroups"]
    assert [(p["IpProtocol"], p["UserIdGroupPairs"]) for p in plain["IpPermissions"]] == [("tcp", [])]


@pytest.mark.parametrize("recorded", [True, False])
def test_teardown_removes_the_placement_group_once_every_node_is_gone(
    cloud: AwsCloud, tags: dict[str, str], recorded: bool
) -> None:
    """Named by the handle, or (a Ctrl-C before the run recorded it) found by the run's tags;
    deleted once every node is terminated (EC2 refuses it before)."""
    request = cluster_request(cloud, tags)
    ids = cloud.launch_cluster(request, 2)
    handle = RunHandle(
        instance_id=ids[0],
        security_group_id=request.security_group_id,
        key_name=request.key.name,
        placement_group=request.placement_group if recorded else None,
    )
    with Ledger.open(cloud.settings) as ledger:
        assert teardown(cloud, ledger, RUN_ID, handle) == []
    assert [cloud.describe(i).state for i in ids] == ["terminated", "terminated"]
    assert placement_groups(cloud) == {}
    assert cloud.owned_resources(OWNER, RUN_ID) == []


def test_teardown_asks_every_node_to_terminate_before_waiting_on_one(
    cloud: AwsCloud, tags: dict[str, str]
) -> None:
    """Nodes shut down together: confirming one after the other would bill the last for
    the waits of all the others."""
    request = cluster_request(cloud, tags)
    ids = cloud.launch_cluster(request, 3)
    calls: list[tuple[str, tuple[str, ...]]] = []
    for operation in ("TerminateInstances", "DescribeInstances"):
        cloud.ec2.meta.events.register(
            f"provide-client-params.ec2.{operation}",
            lambda params, operation=operation, **_: calls.append(
                (operation, tuple(params.get("InstanceIds", ())))
            ),
        )
    handle = RunHandle(
        instance_id=ids[0], security_group_id=request.security_group_id, key_name=request.key.name
    )
    with Ledger.open(cloud.settings) as ledger:
        assert teardown(cloud, ledger, RUN_ID, handle) == []
    first_terminate = calls.index(("TerminateInstances", (ids[0],)))
    first_wait = calls.index(("DescribeInstances", (ids[0],)), first_terminate)
    asked = {ids for operation, ids in calls[first_terminate:first_wait] if operation == "TerminateInstances"}
    assert asked == {(i,) for i in ids}


def test_every_node_gets_the_instance_profile(cloud: AwsCloud, tags: dict[str, str]) -> None:
    """moto associates RunInstances' profile with the first instance only; EC2 with each."""
    profile = cloud.ensure_instance_profile(RUN_ID, ["data-bucket"], tags)
    ids = cloud.launch_cluster(cluster_request(cloud, tags, instance_profile=profile), 3)
    associations = cloud.ec2.describe_iam_instance_profile_associations()["IamInstanceProfileAssociations"]
    assert sorted(a["InstanceId"] for a in associations) == sorted(ids)
    assert {a["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for a in associations} == {profile}


def test_a_terminated_nodes_address_is_free_again(cloud: AwsCloud, tags: dict[str, str]) -> None:
    request = cluster_request(cloud, tags)
    first = cloud.launch_cluster(request, 2)
    addresses = [cloud.describe(i).private_ip for i in first]
    assert addresses == ["127.0.0.2", "127.0.0.3"]
    cloud.terminate(first[0], delay=1)
    again = cloud.launch_cluster(dataclasses.replace(request, client_token=f"{RUN_ID}-2"), 2)
    assert [cloud.describe(i).private_ip for i in again] == ["127.0.0.2", "127.0.0.4"]  # live: unique


def test_a_signal_while_the_placement_group_is_created_undoes_it(
    cloud: AwsCloud, tags: dict[str, str]
) -> None:
    """The run would never record the group, so teardown could not find it by its name."""
    from moto.ec2.responses import EC2Response

    started = time.monotonic()
    with (
        call_in_flight(EC2Response, "create_placement_group", 1.0, signal.SIGINT, (0.3,)),
        pytest.raises(KeyboardInterrupt),
    ):
        cloud.create_placement_group(RUN_ID, tags)
    assert time.monotonic() - started >= 1.0, "the Ctrl-C waited for the answer"
    assert placement_groups(cloud) == {}


def test_teardown_ends_every_node_the_ledger_bills_and_every_launchs_group(
    cloud: AwsCloud, tags: dict[str, str]
) -> None:
    """A node that powered itself off is gone from AWS's live list but not from the bill:
    teardown confirms it and records its end; a relaunched group's placement group (its
    own, ``-r1``) goes with the first's."""
    from pathlib import Path

    from cloudtrain.ledger import InstanceRow, RunRow
    from cloudtrain.records import Lifecycle, RunState

    first = cluster_request(cloud, tags)
    second = cloud.create_placement_group(RUN_ID, tags, launch=1)
    assert second == f"cloudtrain-{RUN_ID}-r1"
    ids = cloud.launch_cluster(dataclasses.replace(first, placement_group=second), 2)
    now = utcnow()
    with Ledger.open(cloud.settings) as ledger:
        ledger.create_run(
            RunRow(
                id=RUN_ID,
                name="two-nodes",
                state=RunState.RUNNING,
                created_at=now,
                job_path="job.yaml",
                backend="tensorflow",
                simulated=True,
                region="us-east-1",
                run_dir=str(Path.cwd()),
            )
        )
        for instance_id in ids:
            ledger.record_instance(
                InstanceRow(
                    id=instance_id,
                    run_id=RUN_ID,
                    instance_type="g4dn.xlarge",
                    zone="us-east-1b",
                    lifecycle=Lifecycle.SPOT,
                    price_per_hour=0.2,
                    on_demand_per_hour=0.5,
                    launched_at=now,
                    disk_gb=50,
                    ebs_per_gb_month=0.08,
                )
            )
            ledger.instance_running(instance_id, now)
        cloud.ec2.terminate_instances(InstanceIds=[ids[1]])  # powered itself off, unrecorded
        handle = RunHandle(
            instance_id=ids[0],
            security_group_id=first.security_group_id,
            key_name=first.key.name,
            placement_group=second,
        )
        assert teardown(cloud, ledger, RUN_ID, handle) == []
        assert [row.terminated_at is not None for row in ledger.instances(RUN_ID)] == [True, True]
    assert placement_groups(cloud) == {}  # both launches' groups
    assert cloud.owned_resources(OWNER, RUN_ID) == []
