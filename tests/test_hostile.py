"""Broken and hostile input: each case ends in one clear error with the right exit code,
never a traceback, never a hang, within bounded time and memory."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import needs
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from sshd import session, sshd_server  # noqa: F401  (fixtures)
from test_aws import RUN_ID, cloud, image_id, launch_request, tags  # noqa: F401  (fixtures)
from test_cli import cli, no_aws  # noqa: F401  (no_aws: a fixture)
from test_run_e2e import CLOUDTRAIN

from cloudtrain import teardown
from cloudtrain.agent.receive import StreamReceiver
from cloudtrain.agent.wire import MAGIC, StreamError
from cloudtrain.cloud.aws import AwsCloud
from cloudtrain.cloud.simulator import ensure_simulator, simulator_status
from cloudtrain.errors import ExitCode, LedgerError, RemoteError, SpecError
from cloudtrain.ledger import InstanceRow, Ledger, RunRow, schema_version
from cloudtrain.records import Lifecycle, RunHandle, RunState, utcnow
from cloudtrain.remote.pull import pull
from cloudtrain.remote.session import Session
from cloudtrain.remote.sync import collect, push, remote_manifest
from cloudtrain.settings import Settings
from cloudtrain.spec import load_job


def _laughs(levels: int = 7, width: int = 9) -> str:
    """A "billion laughs": each level's list names the previous one ``width`` times."""
    lines = ["  l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels + 1):
        lines.append(f"  l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "name: laughs\nrun: echo\nenv:\n" + "\n".join(lines) + "\n"


JOB_FILES = [
    pytest.param(
        _laughs(), "job.yaml:9: the alias *l4 takes the job file past 100,000 values", id="alias-bomb"
    ),
    pytest.param(
        "name: &a [*a]\nrun: echo\n",
        "job.yaml:1: the alias *a refers to the value that holds it",
        id="alias-loop",
    ),
    pytest.param(
        "name: x\nrun: echo\nenv: " + "[" * 5000 + "]" * 5000 + "\n",
        "job.yaml:3: values nested more than 64 levels deep",
        id="deep-nesting",
    ),
    pytest.param(
        "name: x\nrun: echo\nseed: " + "7" * 5000 + "\n",
        "job.yaml:3: seed: a whole number of 5000 digits",
        id="huge-int",
    ),
    pytest.param(
        "name: x\nrun: echo\nenv:\n  ? " + "1" * 5000 + "\n  : x\n",
        "job.yaml:4: env.1111",
        id="huge-int-key",
    ),
    pytest.param(
        "name: x\nrun: echo\nseed: 2001-02-30\n",
        "job.yaml:3: seed: Input should be a valid integer (got '2001-02-30')",
        id="impossible-date",
    ),
    pytest.param(
        "name: x\nrun: echo\nresources: {gpu: 'T4:²'}\n",
        "job.yaml:3: resources.gpu: 'T4:²': the count after ':' must be a positive whole number",
        id="superscript-count",
    ),
    pytest.param(
        'name: x\nrun: echo\nworkdir: "a\\0b"\n',
        "job.yaml:3: workdir: contains a NUL character",
        id="nul-workdir",
    ),
    pytest.param(
        'name: x\nrun: echo\ndata: [{src: "d\\0", dst: d}]\n',
        "job.yaml:3: data[0].src: contains a NUL character",
        id="nul-data-src",
    ),
    pytest.param(
        'name: x\nrun: "python train.py\\0"\n', "job.yaml:2: run: contains a NUL character", id="nul-run"
    ),
    pytest.param(
        'name: x\nrun: echo\nsetup: "pip\\0"\n', "job.yaml:3: setup: contains a NUL character", id="nul-setup"
    ),
    pytest.param(
        'name: x\nrun: echo\nenv: {A: "b\\0"}\n', "job.yaml:3: env.A: contains a NUL character", id="nul-env"
    ),
    pytest.param(
        'name: x\nrun: echo\noutputs: ["out\\0"]\n',
        "job.yaml:3: outputs[0]: contains a NUL character",
        id="nul-outputs",
    ),
    pytest.param(
        "name: x\nrun: '" + "a" * (2 * 2**20) + "'\n",
        "job.yaml: the job file is 2.0 MiB; a job file is at most 1 MiB",
        id="huge-file",
    ),
    pytest.param(
        "name: x\nrun: echo\nresources: {disk_gb: '" + "9" * 100_000 + "'}\n",
        "job.yaml:3: resources.disk_gb: Input should be a valid integer (got '999",
        id="huge-wrong-type",
    ),
]


# Loads a job file in a child process capped at 1 GiB and reports the error, the seconds it
# took and the peak of what it allocated: a case that came back hangs or dies here, never the suite.
LOAD = """
import json, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
from cloudtrain.errors import ExitCode, LedgerError, RemoteError, SpecError
from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.records import Lifecycle, RunState, utcnow
from cloudtrain.remote.pull import pull
from cloudtrain.remote.session import Session
from cloudtrain.remote.sync import collect, push, remote_manifest
from cloudtrain.settings import Settings
from cloudtrain.spec import load_job

def load():
    try:
        load_job(sys.argv[1])
    except SpecError as e:
        return e.message
    return None

started = time.perf_counter()
message = load()
seconds = time.perf_counter() - started
tracemalloc.start()  # a second time for its memory (tracing slows it down)
load()
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"message": message, "seconds": seconds, "peak": peak}))
"""


@pytest.mark.parametrize(("text", "expected"), JOB_FILES)
def test_a_hostile_job_file_is_refused_at_its_line_in_bounded_time_and_memory(
    tmp_path: Path, text: str, expected: str
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(job)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    message = (report["message"] or "").replace(str(tmp_path) + "/", "")
    assert expected in message and "\n" not in message and len(message) < 300, message
    assert report["seconds"] < 2.0 and report["peak"] < 200 * 2**20, report


def test_the_cli_refuses_a_nul_in_run_with_exit_2_before_any_aws_call(tmp_path: Path, no_aws: None) -> None:
    """An SSH command line cannot carry a NUL: refused before anything is launched."""
    job = tmp_path / "job.yaml"
    job.write_text('name: x\nrun: "python train.py\\0"\n')
    for command in (["plan"], ["run", "--yes"]):
        result = cli(*command, str(job))
        assert result.exit_code == 2, result.output
        assert (
            "job.yaml:2: run: contains a NUL character" in result.output and "Traceback" not in result.output
        )


def test_an_env_value_written_beside_a_merge_key_wins_as_written(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text('name: x\nrun: echo\nenv: {<<: {PY: 3.10, N: 010, KEEP: 1.50}, PY: "3.11", N: 007}\n')
    assert load_job(job).env == {"PY": "3.11", "N": "007", "KEEP": "1.50"}


def test_aliases_within_bounds_still_work(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: aliased\nrun: &cmd python train.py\nsetup: *cmd\nenv: &e {PY: '3.10'}\n")
    spec = load_job(job)
    assert spec.setup == spec.run == "python train.py" and spec.env == {"PY": "3.10"}
    job.write_text(_laughs(levels=2))  # 1 + 9 + 81 lists of 9: well within bounds
    with pytest.raises(SpecError, match=r"env.l0: Input should be a valid string"):
        load_job(job)  # refused for its types (env: takes text), as any list there is, not for its size


# --- one error boundary ------------------------------------------------------------------


def test_an_unforeseen_error_exits_70_with_one_line_and_the_traceback_in_a_file(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr("cloudtrain.api.run_status", broken)
    result = cli("status")
    assert result.exit_code == ExitCode.BUG == 70, result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 2  # error, hint
    assert (
        "cloudtrain failed unexpectedly (TypeError: 'NoneType' object is not subscriptable)" in result.output
    )
    reports = list((settings.home / "logs").glob("crash-*.log"))
    assert len(reports) == 1 and str(reports[0]) in result.output
    assert "Traceback" in reports[0].read_text() and "in broken" in reports[0].read_text()


def test_a_second_ctrl_c_while_reporting_the_first_still_exits_130(tmp_path: Path) -> None:
    """The second SIGINT arrives while `interrupted` is printed (after the run's teardown)."""
    script = textwrap.dedent("""
        import os, signal, time
        import cloudtrain.cli as cli

        @cli.main.command("interrupt-me")
        def interrupt_me():
            raise KeyboardInterrupt

        real_print = cli.err.print
        def print_slowly(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, now
            time.sleep(0.5)
            real_print(*args, **kwargs)

        cli.err.print = print_slowly
        cli.main(["interrupt-me"])
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr


# --- broken ledgers and read-only homes ---------------------------------------------------


def _ledger_with_runs(home: Path, runs: int = 120) -> Path:
    path = home / "ledger.sqlite"
    with Ledger(path) as ledger:
        for i in range(runs):
            run_id = f"job-20260301-10{i:04d}-{i:04x}"
            ledger.create_run(RunRow(id=run_id, name="job", state=RunState.SUCCEEDED, created_at=T0))
            ledger.record_instance(
                InstanceRow(
                    id=f"i-{i:017x}",
                    run_id=run_id,
                    instance_type="g4dn.xlarge",
                    zone="us-east-1a",
                    lifecycle=Lifecycle.SPOT,
                    price_per_hour=0.15,
                    on_demand_per_hour=0.5,
                    launched_at=T0,
                )
            )
    with closing(sqlite3.connect(path)) as conn:  # everything into the main file (no -wal)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def _zero_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[2 * 4096 : 6 * 4096] = bytes(4 * 4096)
    path.write_bytes(bytes(data))


def _no_tables(path: Path) -> None:
    path.unlink()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {schema_version()}")  # what this cloudtrain writes, empty


def _edit(sql: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute(sql)

    return edit


RUN = "job-20260301-100003-0003"
T0 = datetime(2026, 3, 1, 10, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("damage", "command", "expected"),
    [
        (_zero_pages, ["status"], "is damaged: database disk image is malformed"),
        (_no_tables, ["status"], "is damaged: no such table: runs"),
        (_no_tables, ["cost-report"], "is damaged: no such table"),
        (
            _edit(f"UPDATE runs SET state = 'weird' WHERE id = '{RUN}'"),
            ["status", RUN],
            f"holds a damaged row (run {RUN}): 'weird' is not a valid RunState",
        ),
        (
            _edit(f"UPDATE runs SET handle = '{{bad' WHERE id = '{RUN}'"),
            ["status", RUN],
            f"holds a damaged row (run {RUN}): Expecting property name",
        ),
        (
            _edit(f"UPDATE runs SET created_at = 'yesterday' WHERE id = '{RUN}'"),
            ["cost-report"],
            f"holds a damaged row (run {RUN}): Invalid isoformat string: 'yesterday'",
        ),
        (
            _edit("UPDATE instances SET price_per_hour = 'cheap' WHERE id = 'i-00000000000000003'"),
            ["status", RUN],
            f"holds a damaged row (an instance of run {RUN}): could not convert string to float: 'cheap'",
        ),
    ],
    ids=[
        "zeroed-pages",
        "no-tables-status",
        "no-tables-report",
        "bad-state",
        "bad-handle",
        "bad-time",
        "bad-price",
    ],
)
def test_a_broken_ledger_is_named_with_exit_2_and_kept_as_it_is(
    settings: Settings, damage: Callable[[Path], None], command: list[str], expected: str
) -> None:
    path = _ledger_with_runs(settings.home)
    damage(path)
    before = path.stat()
    result = cli(*command)
    assert result.exit_code == 2, result.output
    assert f"error: the ledger {path} {expected}" in result.output, result.output
    assert "Traceback" not in result.output and "hint:" in result.output
    after = path.stat()  # never reset or replaced ("repaired")
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)


def test_a_read_only_home_is_named_with_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "ro"
    home.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(home)], capture_output=True
    )
    if mounted.returncode != 0:
        needs.unavailable(f"cannot mount a tmpfs here (root only): {mounted.stderr.decode().strip()}")
    try:
        _ledger_with_runs(home, runs=3)
        subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
        monkeypatch.setenv("CLOUDTRAIN_HOME", str(home))
        for command in (["status"], ["cost-report"]):
            result = cli(*command)
            assert result.exit_code == 2, result.output
            assert f"error: cannot use the ledger {home / 'ledger.sqlite'}" in result.output
        monkeypatch.setenv("CLOUDTRAIN_HOME", str(home / "new"))
        result = cli("status")
        assert result.exit_code == 2 and "Read-only file system" in result.output, result.output
    finally:
        subprocess.run(["umount", "--lazy", str(home)], check=False)  # busy or not, never left mounted


# --- teardown on a full disk ----------------------------------------------------------------


def test_teardown_on_a_full_disk_removes_everything_then_says_what_it_could_not_record(
    cloud: AwsCloud, tags: dict[str, str], image_id: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = launch_request(cloud, tags, image_id)
    instance = cloud.launch(request)
    with Ledger.open(settings) as ledger:
        ledger.create_run(RunRow(id=RUN_ID, name="t", state=RunState.RUNNING, created_at=utcnow()))

        def disk_full(self: Ledger) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(Ledger, "_write", disk_full)  # every ledger write from now on
        with pytest.raises(LedgerError) as failed:
            teardown.teardown(
                cloud,
                ledger,
                RUN_ID,
                RunHandle(
                    instance_id=instance,
                    security_group_id=request.security_group_id,
                    key_name=request.key.name,
                ),
            )
    assert f"teardown of {RUN_ID} ran (nothing is left in the cloud)" in failed.value.message
    assert "database or disk is full" in failed.value.message
    assert cloud.describe(instance).state == "terminated"
    assert cloud.owned_resources(settings.owner, RUN_ID) == []  # the group and the key pair went too
    assert not request.key.path.exists()  # and the local private key


# --- secrets: nowhere they need not be ----------------------------------------------------


def test_the_simulator_gets_an_allow_listed_environment(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wandb-5ecret-of-the-user")
    monkeypatch.setenv("CLOUDTRAIN_SIM_NOTICE_S", "7")
    ensure_simulator(settings)
    state = simulator_status(settings)
    assert state is not None
    environ = Path(f"/proc/{state['pid']}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert b"CLOUDTRAIN_SIM_NOTICE_S=7" in environ and "PATH" in names
    assert "WANDB_API_KEY" not in names and not any(name.startswith("AWS_") for name in names)
    assert b"wandb-5ecret-of-the-user" not in b"\0".join(environ)


# --- a misbehaving instance: what comes off the wire -------------------------------------

FAKE_PACK = """
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "..", "stream.bin"), "rb") as f:
    sys.stdout.buffer.write(f.read())
"""
FAKE_RECEIVE = """
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "..", "manifest.json"), "rb") as f:
    sys.stdout.buffer.write(f.read() + b"\\n")
sys.stdout.flush()
sys.stdin.buffer.read()
"""


def hostile_agent(folder: Path, *, stream: bytes = b"", manifest: bytes = b"") -> str:
    """An instance whose agent answers with what a compromised machine might send."""
    package = folder / "cloudtrain_agent"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pack.py").write_text(FAKE_PACK)
    (package / "receive.py").write_text(FAKE_RECEIVE)
    (folder / "stream.bin").write_bytes(stream)
    (folder / "manifest.json").write_bytes(manifest)
    return str(folder)


def _put(header: str, data: bytes = b"x") -> bytes:
    return header.encode() + b"\n" + data + hashlib.sha256(data).hexdigest().encode() + b"\n"


END = b'{"op":"end","files":1,"bytes":1}\n'
STREAMS = [
    pytest.param(
        MAGIC + _put('{"op":"put","path":"outputs/\\udc80x","size":1,"mode":420,"mtime_ns":1}') + END,
        "refused: path is not valid UTF-8 text",
        id="lone-surrogate",
    ),
    pytest.param(
        MAGIC + _put('{"op":"put","path":"outputs/a","size":1,"mode":420,"mtime_ns":' + "1" + "0" * 30 + "}"),
        "a put record's mtime 1000",
        id="mtime-10e30",
    ),
    pytest.param(
        MAGIC + _put('{"op":"put","path":"outputs/a","size":1,"mode":420,"mtime_ns":9999999999999999999}'),
        "a put record's mtime 9999999999999999999",
        id="mtime-past-64-bits",
    ),
    pytest.param(
        MAGIC + _put('{"op":"put","path":"outputs/a","size":1,"mode":1099511627776,"mtime_ns":1}'),
        "a put record's mode 1099511627776",
        id="mode-huge",
    ),
    pytest.param(
        MAGIC + b'{"op":"put","path":' + b"[" * 20_000 + b"]" * 20_000 + b"}\n",
        "is not a JSON object with an op",
        id="nested-brackets",
    ),
    pytest.param(
        MAGIC + b'{"op":"skip","path":"' + b"a" * 70_000 + b'"}\n',
        "a record header is longer than 65536 bytes",
        id="huge-header-one-chunk",
    ),
    pytest.param(MAGIC + b"[1, 2]\n", "is not a JSON object with an op", id="not-an-object"),
    pytest.param(
        MAGIC + _put('{"op":"put","path":"outputs/a","size":true,"mode":420,"mtime_ns":1}'),
        "a put record's size True",
        id="bool-size",
    ),
]


@pytest.mark.parametrize(("stream", "expected"), STREAMS)
def test_a_hostile_pull_stream_is_a_remote_error_and_writes_nothing_outside(
    session: Session, tmp_path: Path, stream: bytes, expected: str
) -> None:
    fake = hostile_agent(tmp_path / "instance", stream=stream)
    dest = tmp_path / "run"
    with pytest.raises(RemoteError) as failed:
        pull(
            session,
            str(tmp_path / "work"),
            ["outputs"],
            dest,
            remote_python=sys.executable,
            remote_agent_path=fake,
            transport="paramiko",
        )
    assert expected in failed.value.message, failed.value.message
    failed.value.message.encode("utf-8")  # printable as it is
    assert [p.name for p in tmp_path.iterdir()] in (["instance"], ["instance", "run"])
    assert not [p for p in dest.rglob("*") if p.is_file()] if dest.exists() else True


def test_a_hostile_skip_record_is_reported_printably(session: Session, tmp_path: Path) -> None:
    stream = (
        MAGIC
        + b'{"op":"skip","path":"outputs/\\udc80","reason":"\\udcff"}\n{"op":"end","files":0,"bytes":0}\n'
    )
    fake = hostile_agent(tmp_path / "instance", stream=stream)
    report = pull(
        session,
        str(tmp_path / "work"),
        ["outputs"],
        tmp_path / "run",
        remote_python=sys.executable,
        remote_agent_path=fake,
        transport="paramiko",
    )
    assert report.skipped == ("outputs/\\udc80: \\udcff",)


@pytest.mark.parametrize(
    "manifest",
    [
        b'{"version":1,"files":{"train.py":5}}',
        b'{"version":1,"files":{"../x":["",1,420,1]}}',
        b'{"version":1,"files":{"a":["' + b"0" * 64 + b'",1,420,' + b"9" * 30 + b"]}}",
    ],
    ids=["entry-not-a-list", "path-escapes", "mtime-huge"],
)
def test_a_hostile_sync_manifest_is_a_remote_error(session: Session, tmp_path: Path, manifest: bytes) -> None:
    fake = hostile_agent(tmp_path / "instance", manifest=manifest)
    with pytest.raises(RemoteError, match="the instance sent a malformed manifest"):
        remote_manifest(session, str(tmp_path / "work"), remote_python=sys.executable, remote_agent_path=fake)
    work = tmp_path / "local"
    work.mkdir()
    (work / "train.py").write_text("print('hi')\n")
    for transport in ("openssh", "paramiko"):  # the handshake of a first sync, and the session's
        with pytest.raises(RemoteError, match="the instance sent a malformed manifest"):
            push(
                session,
                collect(work),
                str(tmp_path / "work"),
                cache_dir=tmp_path / f"cache-{transport}",
                remote_python=sys.executable,
                remote_agent_path=fake,
                transport=transport,
                openssh_min_bytes=0,
            )


@settings_(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunks=st.lists(st.binary(max_size=300), max_size=6),
    headers=st.lists(
        st.sampled_from(
            [
                b'{"op":"put","path":"a","size":1,"mode":420,"mtime_ns":1}\n',
                b'{"op":"delete","path":"a"}\n',
                b'{"op":"skip","path":1,"reason":null}\n',
                b'{"op":"end","files":1,"bytes":1}\n',
                b'{"op":"put","path":"a/b","size":3}\n',
            ]
        ),
        max_size=4,
    ),
)
def test_the_receiver_only_ever_raises_stream_errors(
    tmp_path: Path, chunks: list[bytes], headers: list[bytes]
) -> None:
    """Whatever arrives, the receiver either applies it or raises StreamError: never another
    exception, never a file outside its folder."""
    dest = tmp_path / "dest"
    receiver = StreamReceiver(str(dest), manifest={}, max_bytes=10_000)
    try:
        receiver.feed(MAGIC)
        for piece in [*headers, *chunks]:
            receiver.feed(piece)
        receiver.finish()
    except StreamError:
        pass
    finally:
        receiver.close()
    assert all(dest in p.resolve().parents for p in dest.rglob("*"))


def test_a_ledger_another_process_holds_is_busy_not_damaged(settings: Settings) -> None:
    path = _ledger_with_runs(settings.home, runs=2)
    with closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(LedgerError, match="is busy") as busy:
            Ledger(path, timeout=0.2)
        holder.execute("ROLLBACK")
    assert "damaged" not in busy.value.message and "mv " not in (busy.value.hint or "")


def test_output_cut_short_by_its_reader_is_no_bug(settings: Settings, tmp_path: Path) -> None:
    """`cloudtrain schema | true`: the reader is gone before cloudtrain writes; exit 141 as a
    shell tool dies of SIGPIPE, not 70 and a crash file."""
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {CLOUDTRAIN} schema | true"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == ExitCode.SIGPIPE == 141, done.stderr
    assert done.stderr == "" and not list((settings.home / "logs").glob("crash-*"))
