"""Issue #6, section 4 (hardening) and the launch-in-flight part of section 5: each
promise with a test that fails when it is broken. Static scans read the shipped code,
examples and docs; the rest runs against moto, a real sshd or the simulated cloud."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import paramiko
import pytest
from botocore.awsrequest import AWSResponse
from fabric import Config, Connection
from sshd import session, sshd_server  # noqa: F401  (fixtures)
from test_aws import RUN_ID, _Body, cloud, image_id, inject, launch_request, tags  # noqa: F401

from cloudtrain import runrecord, teardown
from cloudtrain.agent import wire
from cloudtrain.agent.receive import StreamReceiver
from cloudtrain.agent.redact import LogRedactor
from cloudtrain.cloud import aws
from cloudtrain.cloud.aws import AwsCloud, LaunchRequest, caller_cidr, run_tags, single_address
from cloudtrain.cloud.simulator import simulated_aws
from cloudtrain.errors import InputError, RemoteError
from cloudtrain.ledger import REDACTED, Ledger, RunRow, redact
from cloudtrain.records import RunHandle, RunState, utcnow
from cloudtrain.remote.pull import pull
from cloudtrain.remote.session import Endpoint, PinnedHostKeys, Session
from cloudtrain.remote.sync import collect
from cloudtrain.settings import Settings
from cloudtrain.spec import DataSource

REPO = Path(__file__).resolve().parents[1]
USER_KEY_ID = "AKIAFAKEFAKEFAKEFAKE"  # tests/conftest.py's fake credentials
USER_SECRET = "fake-secret-never-leaves-this-machine"


def shipped(*suffixes: str) -> Iterator[Path]:
    """The files cloudtrain ships: its code, benchmarks, examples, image recipe and docs."""
    for top in ("cloudtrain", "benchmarks", "jobs", "ami", "README.md", "docs"):
        root = REPO / top
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and (not suffixes or path.suffix in suffixes)
            ):
                yield path


def offending_lines(pattern: re.Pattern[str], *suffixes: str) -> list[str]:
    found = []
    for path in shipped(*suffixes):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    return found


# --- SSH never auto-accepts host keys ----------------------------------------------------

TRUST_ON_FIRST_USE = re.compile(
    r"AutoAddPolicy|WarningPolicy"
    r"|StrictHostKeyChecking['\"]?\s*[=:,]?\s*['\"]?\s*(no|off|accept-new)\b"
    r"|UserKnownHostsFile['\"]?\s*[=:,]?\s*['\"]?\s*/dev/null",
    re.IGNORECASE,
)


def test_no_code_or_doc_accepts_unknown_host_keys() -> None:
    assert TRUST_ON_FIRST_USE.search("client.set_missing_host_key_policy(paramiko.AutoAddPolicy())")
    assert TRUST_ON_FIRST_USE.search('options = {"StrictHostKeyChecking": "no"}')
    assert TRUST_ON_FIRST_USE.search("ssh -o StrictHostKeyChecking=accept-new host")
    assert not TRUST_ON_FIRST_USE.search('"StrictHostKeyChecking": "yes",')
    assert offending_lines(TRUST_ON_FIRST_USE) == []


def test_every_ssh_connection_pins_the_host_key(tmp_path: Path) -> None:
    """fabric's Connection accepts any host key by default; the session's never does."""
    key = tmp_path / "key.pem"
    key.write_text("not used: nothing connects")
    key.chmod(0o600)
    pinned = frozenset({"SHA256:" + "A" * 43})
    connection = Session(Endpoint("127.0.0.1", 22, "ubuntu", key, pinned))._new_connection()
    policy = connection.client._policy  # type: ignore[attr-defined]
    assert isinstance(policy, PinnedHostKeys) and policy.fingerprints == pinned
    default = Connection("127.0.0.1", config=Config(overrides={"load_ssh_configs": False}))
    assert isinstance(default.client._policy, paramiko.AutoAddPolicy)  # type: ignore[attr-defined]


# --- private keys ---------------------------------------------------------------------------


def test_a_session_refuses_a_private_key_others_can_read(tmp_path: Path) -> None:
    """`attach`, `pull` and `down` reach a run with the key the ledger names: loosened since
    (chmod 644), it is refused before anything is dialled."""
    key = tmp_path / "run.pem"
    key.write_text("private")
    key.chmod(0o644)
    session = Session(Endpoint("127.0.0.1", 9, "ubuntu", key, frozenset({"SHA256:" + "A" * 43})))
    with pytest.raises(InputError, match="permissions 644") as info:
        session.connect(deadline_s=1)
    assert info.value.hint == f"Run: chmod 600 {key}"
    key.unlink()
    with pytest.raises(RemoteError, match="cannot read the private key"):
        session.connect(deadline_s=1)


# --- the SSH ingress rule: tcp/22 from one /32 -------------------------------------------


def test_ssh_is_only_ever_opened_to_one_address(cloud: AwsCloud, tags: dict[str, str]) -> None:
    assert single_address("203.0.113.7") == "203.0.113.7/32"
    assert single_address(" 203.0.113.7/32 ") == "203.0.113.7/32"
    for wide in ("0.0.0.0/0", "203.0.113.0/24", "::/0", "2001:db8::1/128", "203.0.113.7/31", "me"):
        with pytest.raises(InputError):
            single_address(wide)
    with pytest.raises(InputError, match="0.0.0.0/0"):
        cloud.create_security_group(RUN_ID, "0.0.0.0/0", tags)
    assert (
        cloud.ec2.describe_security_groups(
            Filters=[{"Name": "group-name", "Values": [f"cloudtrain-{RUN_ID}"]}]
        )["SecurityGroups"]
        == []
    ), "nothing is created for a rule that is refused"
    group = cloud.create_security_group(RUN_ID, "198.51.100.4", tags)
    data = cloud.ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]
    assert [
        (p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]], p["Ipv6Ranges"])
        for p in data["IpPermissions"]
    ] == [("tcp", 22, 22, ["198.51.100.4/32"], [])]


def test_the_callers_address_is_checked_wherever_it_comes_from(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InputError, match="CLOUDTRAIN_SSH_CIDR"):
        caller_cidr(settings.with_(ssh_cidr="10.0.0.0/8"))
    assert caller_cidr(settings.with_(ssh_cidr="192.0.2.9")) == "192.0.2.9/32"

    class Reply:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def __enter__(self) -> Reply:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def read(self, size: int = -1) -> bytes:
            return self.body[:size]

    answers = [b"198.51.100.23\n", b"<html>captive portal</html>"]
    monkeypatch.setattr(aws.urllib.request, "urlopen", lambda *_, **__: Reply(answers.pop(0)))
    assert caller_cidr(settings) == "198.51.100.23/32"
    with pytest.raises(InputError, match="checkip"):
        caller_cidr(settings)


# --- the instance: IMDSv2 with hop limit 1, encrypted EBS, no user data -------------------


@pytest.mark.parametrize("spot", [True, False])
def test_every_launch_is_hardened_and_carries_no_credentials(
    cloud: AwsCloud, tags: dict[str, str], image_id: str, spot: bool
) -> None:
    seen: list[dict[str, list[str]]] = []
    inject(cloud, "RunInstances", [], seen)
    request = launch_request(cloud, tags, image_id, spot=spot, max_price=0.4 if spot else None)
    instance_id = cloud.launch(request)
    (sent,) = seen
    assert sent["MetadataOptions.HttpTokens"] == ["required"]
    assert sent["MetadataOptions.HttpPutResponseHopLimit"] == ["1"]
    assert sent["BlockDeviceMapping.1.Ebs.Encrypted"] == ["true"]
    assert not [name for name in sent if name.startswith("UserData")]
    assert USER_SECRET not in json.dumps(sent) and USER_KEY_ID not in json.dumps(sent)

    data = cloud.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert ("InstanceLifecycle" in data) is spot
    volumes = cloud.ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
    )["Volumes"]
    assert [v["Encrypted"] for v in volumes] == [True]
    user_data = cloud.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    assert not user_data.get("UserData", {}).get("Value")


# --- teardown removes what a run made ------------------------------------------------------

# What each AWS call that makes something is undone by (teardown's calls).
UNDONE_BY = {
    "run_instances": "terminate",
    "create_key_pair": "delete_key_pair",
    "create_security_group": "delete_security_group",
    "create_placement_group": "delete_placement_group",
    "authorize_security_group_ingress": "delete_security_group",  # the rule goes with its group
    "create_role": "delete_instance_profile",
    "put_role_policy": "delete_instance_profile",
    "create_instance_profile": "delete_instance_profile",
    "add_role_to_instance_profile": "delete_instance_profile",
}
# Made to outlive the run on purpose: images (`image build`/`image copy`), removed by
# `cloudtrain image rm`; and tags, which are no resource of their own.
NOT_THE_RUNS = {"create_image": "delete_image", "copy_image": "delete_image", "create_tags": None}
MAKING = re.compile(
    r"\b(?:ec2|iam|s3)\.((?:create|run|put|authorize|request|add|allocate|import|copy)_\w+)\("
)


def held(request: Any) -> RunHandle:
    """What a launch request made that teardown removes: its security group and key pair."""
    return RunHandle(security_group_id=request.security_group_id, key_name=request.key.name)


def test_each_kind_of_resource_created_is_deleted_at_teardown() -> None:
    """A new create_* call in the controller fails this until teardown undoes it."""
    controller = [*sorted((REPO / "cloudtrain").glob("*.py")), REPO / "cloudtrain" / "cloud" / "aws.py"]
    made = {m.group(1) for path in controller for m in MAKING.finditer(path.read_text())}
    assert made, "the scan finds nothing: has the code moved?"
    kept = {m for m in made if m in NOT_THE_RUNS}
    made -= kept
    assert made <= set(UNDONE_BY), f"no teardown known for {sorted(made - set(UNDONE_BY))}"
    source = inspect.getsource(teardown.teardown)
    for call in sorted({UNDONE_BY[m] for m in made}):
        assert f"cloud.{call}" in source, f"teardown never calls {call}"
    for call in sorted({NOT_THE_RUNS[m] for m in kept} - {None}):
        assert callable(getattr(AwsCloud, str(call), None)), f"nothing removes what {call} should"


def make_run(cloud: AwsCloud, run_id: str, owner: str) -> tuple[str, LaunchRequest, str]:
    """What a run makes, as the orchestrator makes it: key pair, group, profile, spot instance."""
    run_tag = run_tags(run_id, owner, utcnow() + timedelta(hours=1))
    key = cloud.ensure_key_pair(run_id, run_tag)
    group = cloud.create_security_group(run_id, "127.0.0.1/32", run_tag)
    profile = cloud.ensure_instance_profile(run_id, ["data-bucket"], run_tag)
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
        tags=run_tag,
        instance_profile=profile,
    )
    return cloud.launch(request), request, profile


def test_teardown_leaves_nothing_of_the_run(settings: Settings) -> None:
    other = "other-run-20261128-120000-beef"
    with simulated_aws(settings) as sim, Ledger.open(settings) as ledger:
        cloud = AwsCloud(sim, "us-east-1")
        cloud.ec2.register_image(Name="cloudtrain-gpu-20261128")
        made = {run_id: make_run(cloud, run_id, settings.owner) for run_id in (RUN_ID, other)}
        assert {r.kind for r in cloud.owned_resources(settings.owner, RUN_ID)} == {
            "instance",
            "volume",
            "security-group",
            "key-pair",
        }
        assert cloud.owned_resources("someone-else", RUN_ID) == []  # a run id alone is no filter
        instance_id, request, profile = made[RUN_ID]
        what = held(request).changed(instance_id=instance_id, instance_profile=profile)
        problems = teardown.teardown(cloud, ledger, RUN_ID, what)
        assert problems == []
        assert cloud.owned_resources(settings.owner, RUN_ID) == []
        assert [p.id for p in cloud.owned_instance_profiles(settings.owner)] == [f"cloudtrain-{other}"]
        assert not request.key.path.exists()
        assert {r.kind for r in cloud.owned_resources(settings.owner, other)} >= {
            "instance",
            "security-group",
        }


# --- a launch in flight when Ctrl-C comes ------------------------------------------------------


@contextmanager
def call_in_flight(
    responses: type, action: str, delay_s: float, sig: int = signal.SIGINT, signals_at: tuple[float, ...] = ()
) -> Iterator[None]:
    """The simulated AWS (in this process) takes ``delay_s`` to answer ``action``, and does
    it then; while it works on it, ``sig`` goes to the main thread (where it interrupts
    the blocking read of the answer) at each of ``signals_at`` seconds into the call."""
    current = getattr(responses, action)
    main = threading.main_thread().ident
    assert main is not None
    timers: list[threading.Timer] = []

    def slow(self: Any) -> Any:
        for at in signals_at:
            timers.append(threading.Timer(at, signal.pthread_kill, (main, sig)))
            timers[-1].start()
        time.sleep(delay_s)
        return current(self)

    setattr(responses, action, slow)
    try:
        yield
    finally:
        setattr(responses, action, current)
        for timer in timers:
            timer.cancel()


def run_instances_in_flight(delay_s: float, sig: int, *signals_at: float) -> Any:
    from moto.ec2.responses.instances import InstanceResponse

    return call_in_flight(InstanceResponse, "run_instances", delay_s, sig, signals_at)


def lagging_filters(cloud: AwsCloud) -> None:
    """DescribeInstances with a filter lists nothing yet, as EC2 may right after a launch."""
    empty = (
        b'<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        b"<requestId>lag</requestId><reservationSet/></DescribeInstancesResponse>"
    )

    def lag(request: Any, **_: Any) -> AWSResponse | None:
        body = request.body.decode() if isinstance(request.body, bytes) else str(request.body)
        if "Filter." not in body:
            return None
        return AWSResponse(request.url, 200, {}, _Body(empty))  # type: ignore[arg-type]

    cloud.ec2.meta.events.register("before-send.ec2.DescribeInstances", lag)


@contextmanager
def cli_signal_handlers() -> Iterator[None]:
    """SIGTERM raises SystemExit(143), as the CLI makes it (pytest would die of the default)."""

    def sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(
    ("sig", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)]
)
def test_a_signal_during_run_instances_waits_for_the_instance_id(
    settings: Settings, tags: dict[str, str], sig: int, raised: type[BaseException]
) -> None:
    with simulated_aws(settings) as sim, Ledger.open(settings) as ledger, cli_signal_handlers():
        cloud = AwsCloud(sim, "us-east-1")
        cloud.ec2.register_image(Name="cloudtrain-gpu-20261128")
        request = launch_request(cloud, tags, "")
        lagging_filters(cloud)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        started = time.monotonic()
        with run_instances_in_flight(1.5, sig, 0.3), pytest.raises(raised):
            cloud.launch(request)
        assert time.monotonic() - started >= 1.5, "the signal acted once the answer was in"
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        # the id came back: teardown terminates it though a filter lists nothing yet
        (found,) = cloud.find_run_instances(RUN_ID)
        problems = teardown.teardown(cloud, ledger, RUN_ID, held(request))
        assert problems == []
        assert cloud.describe(found.id).state == "terminated"


def test_a_second_ctrl_c_stops_waiting_and_says_what_may_be_left(
    settings: Settings, tags: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with simulated_aws(settings) as sim, Ledger.open(settings) as ledger:
        cloud = AwsCloud(sim, "us-east-1")
        cloud.ec2.register_image(Name="cloudtrain-gpu-20261128")
        request = launch_request(cloud, tags, "")
        started = time.monotonic()
        with run_instances_in_flight(2.0, signal.SIGINT, 0.3, 0.6):
            with pytest.raises(KeyboardInterrupt):
                cloud.launch(request)
            assert time.monotonic() - started < 2.0, "the second Ctrl-C does not wait for the answer"
            time.sleep(2.0)  # the simulated EC2 makes the instance all the same
        said = caplog.text
        assert "is in flight" in said
        assert f"client token {request.client_token}" in said and f"cloudtrain down {RUN_ID}" in said
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # teardown finds it by the run's tag (no id came back)
        problems = teardown.teardown(cloud, ledger, RUN_ID, held(request))
        assert problems == [] and cloud.find_run_instances(RUN_ID) == []


@pytest.mark.parametrize("made", ["key pair", "security group", "instance profile"])
def test_a_signal_during_a_create_call_undoes_it(settings: Settings, tags: dict[str, str], made: str) -> None:
    """The run would never record what the call made, so teardown could not find it."""
    from moto.ec2.responses.key_pairs import KeyPairs
    from moto.ec2.responses.security_groups import SecurityGroups
    from moto.iam.responses import IamResponse

    slowed, make = {
        "key pair": ((KeyPairs, "create_key_pair"), lambda c: c.ensure_key_pair(RUN_ID, tags)),
        "security group": (
            (SecurityGroups, "create_security_group"),
            lambda c: c.create_security_group(RUN_ID, "127.0.0.1/32", tags),
        ),
        "instance profile": (
            (IamResponse, "create_role"),
            lambda c: c.ensure_instance_profile(RUN_ID, ["data-bucket"], tags),
        ),
    }[made]
    with simulated_aws(settings) as sim:
        cloud = AwsCloud(sim, "us-east-1")
        started = time.monotonic()
        with (
            call_in_flight(*slowed, 1.0, signal.SIGINT, (0.3,)),
            pytest.raises(KeyboardInterrupt),
        ):
            make(cloud)
        assert time.monotonic() - started >= 1.0, "the Ctrl-C waited for the answer"
        assert cloud.owned_resources(settings.owner, RUN_ID) == []
        assert cloud.owned_instance_profiles(settings.owner) == []
        assert list(settings.keys_dir.glob("*.pem")) == []


def test_terminate_asks_again_about_an_id_ec2_does_not_know_yet(
    cloud: AwsCloud, tags: dict[str, str], image_id: str
) -> None:
    """Right after a launch EC2 may not know the new id: teardown must not take that for
    'already gone'. An id this process never launched is taken as gone at once."""
    from test_aws import ec2_error

    instance_id = cloud.launch(launch_request(cloud, tags, image_id))
    seen: list[dict[str, list[str]]] = []
    inject(cloud, "TerminateInstances", [ec2_error("InvalidInstanceID.NotFound")] * 2, seen)
    cloud.terminate(instance_id, delay=1, not_found_delay=0.1)
    assert len(seen) == 3 and cloud.describe(instance_id).state == "terminated"
    unknown: list[dict[str, list[str]]] = []
    inject(cloud, "TerminateInstances", [ec2_error("InvalidInstanceID.NotFound")] * 2, unknown)
    cloud.terminate("i-0123456789abcdef0", delay=1, not_found_delay=0.1)
    assert len(unknown) == 1


# --- no AWS credentials in the synced files ---------------------------------------------------


def test_aws_credentials_are_never_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A workdir that holds them (the home folder, a copy of it, a link to them)."""
    work = tmp_path / "home"
    (work / ".aws" / "sso" / "cache").mkdir(parents=True)
    (work / ".aws" / "credentials").write_text(f"[default]\naws_secret_access_key = {USER_SECRET}\n")
    (work / ".aws" / "sso" / "cache" / "token.json").write_text('{"accessToken": "t"}')
    (work / "keys.ini").write_text(f"aws_secret_access_key = {USER_SECRET}\n")
    (work / "train.py").write_text("print('hi')\n")
    (work / "creds-link").symlink_to(work / ".aws" / "credentials")
    monkeypatch.setenv("HOME", str(work))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(work / "keys.ini"))
    found = collect(work)
    assert [f.path for f in found] == ["train.py"]
    assert sum("AWS credentials never go to the instance" in w for w in found.warnings) == 3
    with pytest.raises(RemoteError, match="holds AWS credentials"):
        collect(tmp_path / "home", data_sources=[DataSource(src=str(work / ".aws"), dst="data/aws")])


# --- pulled files land only where they were asked for -------------------------------------


def hostile_stream(files: dict[str, bytes]) -> bytes:
    stream = wire.MAGIC
    for path, body in files.items():
        stream += wire.put_header(path, len(body), 0o644, 0) + body
        stream += hashlib.sha256(body).hexdigest().encode() + b"\n"
    return stream + wire.end_header(files=len(files), bytes=sum(map(len, files.values())))


def test_the_receiver_takes_only_the_paths_asked_for(tmp_path: Path) -> None:
    stream = hostile_stream({"checkpoint/w.npz": b"w", "job.yaml": b"run: evil", "checkpointx": b"x"})
    for piece in (len(stream), 5):  # whole records, and records split across chunks
        dest = tmp_path / f"dest{piece}"
        receiver = StreamReceiver(str(dest), only=["checkpoint/"])
        for i in range(0, len(stream), piece):
            receiver.feed(stream[i : i + piece])
        receiver.finish()
        receiver.close()
        assert receiver.paths_written == ["checkpoint/w.npz"]
        assert sorted(p for p, _ in receiver.errors) == ["checkpointx", "job.yaml"]
        assert all("not among the paths asked for" in why for _, why in receiver.errors)
        assert sorted(p.name for p in dest.iterdir()) == ["checkpoint"]


def test_a_hostile_instance_cannot_write_beside_a_pulled_checkpoint(session: Session, tmp_path: Path) -> None:
    """The checkpoint is pulled into the run folder itself: an instance that sends
    job.yaml too (which `attach` reads back) must not replace it."""
    agent = tmp_path / "hostile"
    (agent / "cloudtrain_agent").mkdir(parents=True)
    (agent / "cloudtrain_agent" / "__init__.py").write_text("")
    stream = tmp_path / "stream.bin"
    stream.write_bytes(hostile_stream({"checkpoint/w.npz": b"weights", "job.yaml": b"data: [{src: ~/.ssh}]"}))
    (agent / "cloudtrain_agent" / "pack.py").write_text(
        f"import sys\nsys.stdout.buffer.write(open({str(stream)!r}, 'rb').read())\n"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text("name: mine\n")
    with pytest.raises(RemoteError, match="job.yaml: refused: not among the paths asked for"):
        pull(
            session,
            str(tmp_path),
            ["checkpoint"],
            run_dir,
            remote_python=sys.executable,
            remote_agent_path=str(agent),
            into="",
        )
    assert (run_dir / "job.yaml").read_text() == "name: mine\n"
    assert (run_dir / "checkpoint" / "w.npz").read_bytes() == b"weights"


# --- secrets: redacted wherever free text reaches the ledger, and in logs -----------------


def test_the_ledger_writes_secrets_as_stars(settings: Settings) -> None:
    with Ledger.open(settings) as ledger:
        ledger.create_run(RunRow(RUN_ID, "digits", RunState.RUNNING, utcnow()))
        ledger.redact(["s3cr3t-value", "ab"])  # too short to redact without blotting ids
        ledger.add_event(RUN_ID, "error", "remote command failed: TOKEN=s3cr3t-value; ab")
        assert ledger.events(RUN_ID)[-1].message == f"remote command failed: TOKEN={REDACTED}; ab"
        record = json.dumps(runrecord.run_record(ledger, RUN_ID))  # what `status --json` shows
    assert "s3cr3t-value" not in record
    assert b"s3cr3t-value" not in Path(settings.ledger_path).read_bytes()


def test_log_redaction_catches_a_secret_split_between_pieces() -> None:
    assert redact("a=hunter22, b=hunter2", ["hunter2", "hunter22"]) == f"a={REDACTED}, b={REDACTED}"
    log = b"epoch 1\ntoken is s3cr3t-value, again s3cr3t-value\ns3cr3t-val"
    for size in (1, 3, 7, len(log)):
        redactor = LogRedactor(["s3cr3t-value"])
        out = b"".join(redactor.feed(log[i : i + size]) for i in range(0, len(log), size)) + redactor.flush()
        assert out == b"epoch 1\ntoken is ************, again ************\ns3cr3t-val"
        assert len(out) == len(log)  # offsets into the log stay true
    redactor = LogRedactor(["s3cr3t-value"])
    assert redactor.feed(b"line\n") == b"line\n"  # nothing held back that cannot begin a secret
    assert LogRedactor([]).feed(b"s3") == b"s3"


# --- pulled Keras models: docs and examples load weights, or with safe_mode -------------------

UNSAFE_LOADING = re.compile(
    r"safe_mode\s*=\s*False|enable_unsafe_deserialization|allow_pickle\s*=\s*True"
    r"|\bpickle\.loads?\(|\bmarshal\.loads?\(|\bjoblib\.load\(|\byaml\.load\(|\btorch\.load\("
)


def test_pulled_models_are_loaded_as_weights_or_in_safe_mode() -> None:
    assert UNSAFE_LOADING.search("keras.saving.load_model(path, safe_mode=False)")
    assert offending_lines(UNSAFE_LOADING, ".py", ".md", ".yaml", ".sh") == []
    # load_model (Keras 2 has no safe_mode: a Lambda layer in a pulled .h5 runs code) only
    # with safe_mode=True said out loud
    unsafe_model = [
        line
        for line in offending_lines(re.compile(r"\bload_model\("), ".py", ".md")
        if "safe_mode=True" not in line
    ]
    assert unsafe_model == []
    examples = [p for p in (REPO / "jobs").rglob("*.py")]
    assert examples and all("save_weights(" in p.read_text() for p in examples)


# --- a Ctrl-C in a ledger write ---------------------------------------------------------------


class InterruptedOnce:
    """A connection whose next BEGIN takes effect, then is interrupted (Ctrl-C)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.armed = True

    def execute(self, sql: str, *args: Any) -> Any:
        result = self.conn.execute(sql, *args)
        if self.armed and sql.startswith("BEGIN"):
            self.armed = False
            raise KeyboardInterrupt
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_ctrl_c_in_a_ledger_write_leaves_the_ledger_usable_for_teardown(settings: Settings) -> None:
    """Seen in the launch-in-flight case of test_ctrl_c_in_each_phase_leaves_nothing_running:
    the run's next writes (teardown's events, the cancelled state) all failed."""
    with Ledger.open(settings) as ledger:
        ledger.create_run(RunRow(RUN_ID, "digits", RunState.LAUNCHING, utcnow()))
        real = ledger._conn
        ledger._conn = InterruptedOnce(real)  # type: ignore[assignment]
        with pytest.raises(KeyboardInterrupt):
            ledger.update_run(RUN_ID, handle={"security_group_id": "sg-1"})
        ledger._conn = real
        assert not real.in_transaction
        ledger.add_event(RUN_ID, "terminated", "i-1 terminated (confirmed)")
        ledger.update_run(RUN_ID, state=RunState.CANCELLED)
        run = ledger.get_run(RUN_ID)
        assert run is not None and run.state is RunState.CANCELLED and run.handle.security_group_id is None
        assert [e.kind for e in ledger.events(RUN_ID)] == ["terminated"]


def test_a_second_ctrl_c_during_teardown_says_what_is_left_and_how_to_remove_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import os
    import signal as signals

    from cloudtrain.teardown import shielded_from_signals

    finished = False
    with caplog.at_level("WARNING"), shielded_from_signals(lambda: "instance i-1 (`cloudtrain down r-1`)"):
        os.kill(os.getpid(), signals.SIGINT)  # noted, not obeyed: teardown goes on
        finished = True
    assert finished
    assert (
        "teardown in progress: it finishes first; still to remove: instance i-1 (`cloudtrain down r-1`)"
        in (caplog.text)
    )
