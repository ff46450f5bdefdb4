"""The simulated cloud: a background moto server whose instances are real SSH hosts."""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import timedelta

import pytest

from cloudtrain.bringup import wait_for_fingerprints
from cloudtrain.cloud.aws import TAG_SSH, AwsCloud, LaunchedInstance, LaunchRequest, run_tags
from cloudtrain.cloud.simulator import ensure_simulator, simulated_aws, simulator_status, stop_simulator
from cloudtrain.errors import CloudError, RemoteError
from cloudtrain.records import RunHandle, parse_iso, utcnow
from cloudtrain.remote.session import Endpoint, HostKeyMismatch, Session
from cloudtrain.settings import Settings

RUN_ID = "sim-test-20261128-120000-abcd"


def launch(cloud: AwsCloud, token: str = f"{RUN_ID}-1") -> tuple[str, LaunchRequest]:
    tags = run_tags(RUN_ID, "tester@testhost", utcnow() + timedelta(hours=1))
    key = cloud.ensure_key_pair(RUN_ID, tags)
    request = LaunchRequest(
        run_id=RUN_ID,
        instance_type="g4dn.xlarge",
        zone="us-east-1a",
        spot=True,
        max_price=None,
        disk_gb=50,
        image=cloud.resolve_image(None),
        key=key,
        security_group_id=cloud.create_security_group(RUN_ID, "127.0.0.1/32", tags),
        client_token=token,
        tags=tags,
    )
    return cloud.launch(request), request


def wait_for_host(cloud: AwsCloud, instance_id: str) -> LaunchedInstance:
    """The instance once its simulated host is up (tagged with its endpoint)."""
    running = cloud.describe(instance_id)
    for _ in range(100):  # the simulator notices the instance within a poll or two
        running = cloud.describe(instance_id)
        if running.ssh_port != 22:
            break
        time.sleep(0.1)
    return running


def test_client_token_makes_one_instance(settings: Settings) -> None:
    with simulated_aws(settings) as sim:
        cloud = AwsCloud(sim, "us-east-1")
        cloud.ec2.register_image(Name="cloudtrain-gpu-test")
        first, request = launch(cloud)
        again = cloud.launch(request)  # a retried call with the same token
        assert again == first
        reservations = cloud.ec2.describe_instances()["Reservations"]
        assert sum(len(r["Instances"]) for r in reservations) == 1


def test_background_simulator_lifecycle(settings: Settings) -> None:
    sim = ensure_simulator(settings)
    state = simulator_status(settings)
    assert state is not None and sim.endpoint_url == state["endpoint"]
    assert sim.simulated and sim.ssh_cidr == "127.0.0.1/32"
    again = ensure_simulator(settings)  # reused, not a second process
    assert again.endpoint_url == sim.endpoint_url
    assert simulator_status(settings)["pid"] == state["pid"]  # type: ignore[index]
    # The cloudtrain image is registered, found by the same lookup a real run uses.
    assert AwsCloud(sim, "us-east-1").resolve_image(None).name == "cloudtrain-gpu-simulated"
    assert stop_simulator(settings)
    assert simulator_status(settings) is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(state["pid"]), 0)


def test_instance_becomes_ssh_host_and_termination_stops_it(settings: Settings) -> None:
    sim = ensure_simulator(settings)
    cloud = AwsCloud(sim, "us-east-1")
    instance_id, request = launch(cloud)
    # From the first answer on, a simulated instance's address is its own loopback address
    # (127.0.0.N, its private IP too): nothing can dial the random IPs moto would invent.
    address = cloud.describe(instance_id).private_ip
    assert address and address.startswith("127.0.0.") and address != "127.0.0.1"
    assert cloud.describe(instance_id).ssh_host == address
    running = cloud.wait_running(instance_id, delay=1)
    running = wait_for_host(cloud, instance_id)
    assert running.ssh_host == address and running.ssh_port != 22
    tags = {
        t["Key"]: t["Value"]
        for t in cloud.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])["Tags"]
    }
    assert tags[TAG_SSH] == f"{address}:{running.ssh_port}"

    fingerprints = wait_for_fingerprints(cloud, instance_id, timeout=20)
    assert fingerprints and all(f.startswith("SHA256:") for f in fingerprints)
    endpoint = Endpoint(address, running.ssh_port, "ubuntu", request.key.path, fingerprints)
    with Session(endpoint) as session:
        result = session.run("echo $HOME; env")
        home, env = result.text.split("\n", 1)
        assert home.endswith(f"/sim/instances/{instance_id}/home")
        assert "AWS_SECRET_ACCESS_KEY" not in env and "fake-secret" not in env
        assert f"CLOUDTRAIN_SIM_INSTANCE={instance_id}" in env

    wrong = Endpoint(address, running.ssh_port, "ubuntu", request.key.path, frozenset({"SHA256:" + "A" * 43}))
    with pytest.raises(HostKeyMismatch):
        Session(wrong).connect(deadline_s=5)

    cloud.terminate(instance_id, delay=1)
    time.sleep(1.0)
    with pytest.raises(RemoteError):
        Session(endpoint).connect(deadline_s=2)


def test_a_clusters_nodes_listen_on_their_own_private_ips(settings: Settings) -> None:
    """Two instances of one RunInstances: each its own 127.0.0.N as private IP, SSH and IMDS
    address, console host name; each node reaches the other at its private IP."""
    sim = ensure_simulator(settings)
    cloud = AwsCloud(sim, "us-east-1")
    _, single = launch(cloud)  # key pair, group, image
    ids = cloud.launch_cluster(dataclasses.replace(single, client_token=f"{RUN_ID}-cluster"), 2)
    nodes = [wait_for_host(cloud, i) for i in ids]
    addresses = [n.private_ip for n in nodes]
    assert len(set(addresses)) == 2 and all(a and a.startswith("127.0.0.") for a in addresses)
    assert [n.ssh_host for n in nodes] == addresses and all(n.ssh_port != 22 for n in nodes)
    sessions = []
    for node in nodes:
        fingerprints = wait_for_fingerprints(cloud, node.id, timeout=20)
        assert f"root@ip-{str(node.private_ip).replace('.', '-')} " in cloud.console_output(node.id)
        sessions.append(
            Session(Endpoint(str(node.ssh_host), node.ssh_port, "ubuntu", single.key.path, fingerprints))
        )
    with sessions[0] as first, sessions[1] as second:
        assert first.run('printf %s "$CLOUDTRAIN_IMDS_ENDPOINT"').text.startswith(f"http://{addresses[0]}:")
        # the chief's side of a collective: the worker dials it at its private IP
        dial = f"exec 3<>/dev/tcp/{addresses[0]}/{nodes[0].ssh_port} && echo reached"
        assert second.run(dial, timeout=10).text.strip() == "reached"
    for instance_id in ids:
        cloud.terminate(instance_id, delay=1)


def test_poweroff_hook_terminates_the_instance(settings: Settings) -> None:
    sim = ensure_simulator(settings)
    cloud = AwsCloud(sim, "us-east-1")
    instance_id, request = launch(cloud)
    cloud.wait_running(instance_id, delay=1)
    fingerprints = wait_for_fingerprints(cloud, instance_id, timeout=20)
    running = cloud.describe(instance_id)
    endpoint = Endpoint(running.ssh_host or "", running.ssh_port, "ubuntu", request.key.path, fingerprints)
    with Session(endpoint) as session:
        session.run('"$CLOUDTRAIN_POWEROFF_HOOK"')
    for _ in range(100):
        if cloud.describe(instance_id).state == "terminated":
            break
        time.sleep(0.1)
    assert cloud.describe(instance_id).state == "terminated"


def test_teardown_finds_an_instance_whose_id_never_came_back(settings: Settings) -> None:
    """A launch interrupted after EC2 made the instance: teardown finds it by the run's tag."""
    from cloudtrain.ledger import Ledger
    from cloudtrain.teardown import teardown

    with simulated_aws(settings) as sim:
        cloud = AwsCloud(sim, "us-east-1")
        cloud.ec2.register_image(Name="cloudtrain-gpu-test")
        instance_id, request = launch(cloud)
        with Ledger.open(settings) as ledger:
            problems = teardown(
                cloud,
                ledger,
                RUN_ID,
                RunHandle(security_group_id=request.security_group_id, key_name=request.key.name),
            )
        assert problems == []
        assert cloud.describe(instance_id).state == "terminated"
        assert cloud.find_run_instances(RUN_ID) == []


def test_down_retries_a_teardown_that_left_something_behind(settings: Settings) -> None:
    """The hint of an incomplete teardown is `cloudtrain down RUN`: it must retry it, once."""
    from cloudtrain.api import down_runs
    from cloudtrain.ledger import Ledger, RunRow
    from cloudtrain.records import RunState

    cloud = AwsCloud(ensure_simulator(settings), "us-east-1")
    instance_id, request = launch(cloud)
    handle = RunHandle(
        instance_id=instance_id, security_group_id=request.security_group_id, key_name=request.key.name
    )
    with Ledger.open(settings) as ledger:
        row = RunRow(
            RUN_ID, "sim-test", RunState.FAILED, utcnow(), simulated=True, region="us-east-1", handle=handle
        )
        ledger.create_run(row)
        ledger.add_event(RUN_ID, "teardown-incomplete", f"instance {instance_id}: RequestLimitExceeded")
    assert request.key.path.exists()

    assert down_runs([], settings, all_active=True) == [RUN_ID]  # --all finds it too
    assert cloud.describe(instance_id).state == "terminated"
    assert cloud.find_run_instances(RUN_ID) == []
    assert not request.key.path.exists()  # nothing left to reach: the private key is gone
    with Ledger.open(settings) as ledger:
        run = ledger.get_run(RUN_ID)
        assert run is not None and run.state is RunState.FAILED  # its outcome is kept
        assert [e.kind for e in ledger.events(RUN_ID)][-1] == "down"
    assert down_runs([RUN_ID], settings) == []  # done: not again


def test_scheduled_interruption_notice_then_termination(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """schedule_interruption: the instance's own IMDS announces it, then moto terminates it
    CLOUDTRAIN_SIM_NOTICE_S later, which stops its host and every process on it."""
    from cloudtrain.agent.imds import ImdsClient
    from cloudtrain.cloud.simulator import schedule_interruption

    monkeypatch.setenv("CLOUDTRAIN_SIM_NOTICE_S", "5")
    monkeypatch.setenv("CLOUDTRAIN_IMDS_POLL_S", "0.5")  # handed on to the hosts' agents
    sim = ensure_simulator(settings)
    cloud = AwsCloud(sim, "us-east-1")
    instance_id, request = launch(cloud)
    cloud.wait_running(instance_id, delay=1)
    fingerprints = wait_for_fingerprints(cloud, instance_id, timeout=20)
    running = cloud.describe(instance_id)
    endpoint = Endpoint(running.ssh_host or "", running.ssh_port, "ubuntu", request.key.path, fingerprints)
    with Session(endpoint) as session:
        imds_url = session.run('printf %s "$CLOUDTRAIN_IMDS_ENDPOINT"').text
        assert session.run('printf %s "$CLOUDTRAIN_IMDS_POLL_S"').text == "0.5"
        pid = int(session.run("setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!").text)
    assert imds_url.startswith(f"http://{running.ssh_host}:")  # its loopback address, never 169.254.169.254
    imds = ImdsClient(imds_url, timeout_s=2)
    assert imds.instance_id() == instance_id
    nothing = imds.poll()
    assert nothing.known and nothing.instance_action is None and nothing.rebalance is None

    with pytest.raises(CloudError, match="no instance i-00000000"):
        schedule_interruption(settings, "i-0000000000000000")

    rebalance = schedule_interruption(settings, instance_id, kind="rebalance")
    assert rebalance["kind"] == "rebalance" and rebalance["action_at"] is None
    for _ in range(40):
        if imds.poll().rebalance:
            break
        time.sleep(0.1)
    poll = imds.poll()
    assert poll.rebalance is not None and set(poll.rebalance) == {"noticeTime"}
    assert poll.instance_action is None  # a rebalance recommendation is not a notice

    asked = time.time()
    scheduled = schedule_interruption(settings, instance_id, delay_s=3.0)
    assert scheduled["instance_id"] == instance_id and scheduled["kind"] == "terminate"
    notice_at, action_at = parse_iso(scheduled["notice_at"]), parse_iso(scheduled["action_at"])
    assert 4.0 <= (action_at - notice_at).total_seconds() <= 6.0  # the notice period, to the second
    assert imds.poll().instance_action is None and time.time() < asked + 2.5  # not yet due: still 404
    for _ in range(60):
        poll = imds.poll()
        if poll.instance_action:
            break
        time.sleep(0.1)
    assert poll.instance_action is not None and poll.instance_action["action"] == "terminate"
    seen = time.time()
    termination = parse_iso(poll.instance_action["time"]).timestamp()
    assert termination - seen <= 6  # announced about 5 s ahead
    state = cloud.describe(instance_id).state
    assert state == "running" and time.time() < termination - 1  # the notice comes first

    for _ in range(100):
        if cloud.describe(instance_id).state == "terminated":
            break
        time.sleep(0.1)
    assert cloud.describe(instance_id).state == "terminated"
    assert time.time() >= termination - 1  # not before the notice ran out
    with pytest.raises(RemoteError):
        Session(endpoint).connect(deadline_s=2)
    for _ in range(50):  # the host's processes went with it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not imds.poll().known  # and so did its IMDS: unknown, never "no notice"
    with pytest.raises(CloudError, match="terminated"):
        schedule_interruption(settings, instance_id)
