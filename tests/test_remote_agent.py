"""The controller's side of the agent (cloudtrain/remote/agent.py): the one module that
builds its command lines, each of which the agent's own parser reads back as meant, and
the log follower shared by `run`, `attach` and `logs -f`."""

from __future__ import annotations

import ast
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloudtrain.agent.cli import build_parser
from cloudtrain.errors import RemoteError
from cloudtrain.recovery import InstanceLost
from cloudtrain.remote.agent import AgentCli, AgentConfig, LogFollower, RemoteAgent
from cloudtrain.remote.session import Result

PACKAGE = Path(__file__).resolve().parents[1] / "cloudtrain"
AGENT_MODULE = PACKAGE / "remote" / "agent.py"


class LocalShell:
    """A Session's run and stream, each command run by bash here with HOME at ``home``, as
    the instance's shell would run it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.stdin: list[bytes | None] = []

    def run(
        self, command: str, *, stdin: bytes | None = None, check: bool = True, timeout: float | None = None
    ) -> Result:
        env = {**os.environ, "HOME": str(self.home)}
        done = subprocess.run(
            ["bash", "-c", command],
            input=stdin or b"",
            capture_output=True,
            cwd=self.home,
            env=env,
            timeout=60,
        )
        self.stdin.append(stdin)
        return Result(done.returncode, done.stdout, done.stderr)

    def stream(
        self,
        command: str,
        sink: Callable[[bytes], Any],
        *,
        stdin: bytes | None = None,
        errors: Callable[[bytes], Any] | None = None,
    ) -> int:
        result = self.run(command, stdin=stdin)
        sink(result.stdout)
        if errors is not None:
            errors(result.stderr)
        return result.exit_code


@pytest.fixture
def echoing(tmp_path: Path) -> tuple[RemoteAgent, list[Any]]:
    """A RemoteAgent whose 'python' prints its arguments: each call's arguments, as the
    instance's shell handed them to the agent, parsed by the agent's own parser."""
    shell = LocalShell(tmp_path)
    agent = RemoteAgent(shell, "theano")  # type: ignore[arg-type]
    agent.cli = AgentCli(python="printf '%s\\0'", path=None)
    parsed: list[Any] = []
    real_run = shell.run

    def run(command: str, **kw: Any) -> Result:
        result = real_run(command, **kw)
        words = result.stdout.decode().split("\0")[:-1]
        assert words[:2] == ["-m", "cloudtrain_agent"], words
        parsed.append(build_parser().parse_args(words[2:]))
        return result

    shell.run = run  # type: ignore[method-assign]
    return agent, parsed


def test_each_command_line_reaches_the_agents_parser_as_meant(echoing: tuple[RemoteAgent, list[Any]]) -> None:
    agent, parsed = echoing
    awkward = "python train.py --name 'a b' \"$NOT_EXPANDED\" `nor this`; echo $((1+1))"
    config = AgentConfig(
        "theano",
        seed=7,
        keras=2,
        env={"GREETING": "hello world", "Q": "it's $HOME"},
        checkpoint_every=3,
        checkpoint_s3="s3://bucket/ckpt/run-1/",
        region="eu-west-1",
    )
    agent.configure(config, gpu="no")
    agent.verify(2, expect_gpu=True)
    agent.start(awkward, "pip install -r 'requirements file.txt'", {"TOKEN": "s3cr3t"})
    agent.status()
    agent.tail(120, lambda data: None, follow=True, for_s=15, on_beat=lambda beat: None)
    agent.metrics(345)
    agent.watchdog(
        "2026-12-06T12:00:00Z",
        1800.0,
        ["model.h5", "out dir/preds.npy"],
        "s3://b/p/",
        "eu-west-1",
        max_idle_s=6.0,
        on_idle="warn",
    )
    agent.collected(keep_until="2026-12-07T00:00:00Z")
    agent.fetch_s3("s3://data/set one/", "work/data dir", "us-east-2")
    agent.restore_checkpoint("s3://bucket/ckpt/run-1/", "eu-west-1")
    backend, verify, start, status, tail, metrics, watchdog, collected, fetch, restore = parsed
    home = str(agent.session.home)  # type: ignore[attr-defined]

    assert backend.command == "backend" and backend.backend == "theano" and backend.home == home
    assert backend.gpu == "no"
    assert (backend.seed, backend.keras, backend.checkpoint_every) == (7, 2, 3)
    assert backend.checkpoint_dir == f"{home}/.cloudtrain/checkpoint"
    assert (backend.checkpoint_s3, backend.region) == ("s3://bucket/ckpt/run-1/", "eu-west-1")
    assert backend.compile_cache == "/opt/cloudtrain/theano-cache"
    path, *job_env = backend.env
    assert path[0] == "PATH" and path[1].startswith("/opt/cloudtrain/envs/theano/bin:")
    assert job_env == [("GREETING", "hello world"), ("Q", "it's $HOME")]
    assert (agent.session.home / ".cloudtrain" / "run").is_dir()  # type: ignore[attr-defined]

    assert (verify.backend, verify.keras, verify.expect_gpu) == ("theano", 2, True)
    assert verify.env_file == ".cloudtrain/run/env.json"
    assert start.run == awkward and start.setup == "pip install -r 'requirements file.txt'"
    assert start.workdir == "work" and start.run_dir == ".cloudtrain/run"
    assert agent.session.stdin[2] == b'{"TOKEN": "s3cr3t"}'  # type: ignore[attr-defined]  # never argv
    assert status.command == "status"
    assert (tail.offset, tail.follow, tail.for_s, tail.progress) == (120, True, 15.0, True)
    assert (metrics.command, metrics.run_dir, metrics.offset) == ("metrics", ".cloudtrain/run", 345)
    assert watchdog.output == ["model.h5", "out dir/preds.npy"] and watchdog.grace == 1800.0
    assert (watchdog.max_idle, watchdog.on_idle) == (6.0, "warn")
    assert (watchdog.deadline, watchdog.s3, watchdog.region) == (
        "2026-12-06T12:00:00Z",
        "s3://b/p/",
        "eu-west-1",
    )
    assert collected.keep_until == "2026-12-07T00:00:00Z"
    assert (fetch.src, fetch.dst, fetch.region) == ("s3://data/set one/", "work/data dir", "us-east-2")
    assert restore.dir == f"{home}/.cloudtrain/checkpoint" and restore.url == "s3://bucket/ckpt/run-1/"


def test_an_image_build_configures_a_backend_without_job_options(
    echoing: tuple[RemoteAgent, list[Any]],
) -> None:
    agent, parsed = echoing
    agent.run_dir = ".cloudtrain/build/theano"
    agent.configure(None)
    (backend,) = parsed
    assert backend.run_dir == ".cloudtrain/build/theano"
    assert (backend.seed, backend.keras, backend.checkpoint_dir, backend.compile_cache) == (
        None,
        None,
        None,
        None,
    )
    assert [key for key, _ in backend.env] == ["PATH"] and backend.gpu == "auto"


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """Each string literal and f-string part, docstrings left out."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_agent_command_lines_are_built_in_remote_agent_only() -> None:
    """Outside remote/agent.py (and the agent itself), no code spells the agent's module or
    its options: a new command line there would fail here."""
    marks = ("cloudtrain_agent", "--run-dir", "PYTHONPATH=")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == AGENT_MODULE or PACKAGE / "agent" in path.parents:
            continue
        for line, text in _string_constants(ast.parse(path.read_text(), str(path))):
            if any(mark in text for mark in marks):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}")
    assert found == []
    # and the test sees them where they are
    assert any(
        "cloudtrain_agent" in text for _, text in _string_constants(ast.parse(AGENT_MODULE.read_text()))
    )


class ScriptedAgent:
    """A RemoteAgent whose tail and status follow a script; a drop is a RemoteError."""

    def __init__(self, log: bytes, rounds: list[Any]) -> None:
        self.log = log
        self.rounds = rounds  # per round: bytes up to which the log has grown, or an exception
        self.status_now: dict[str, Any] = {"running": True, "exit_code": None}
        self.offsets: list[int] = []
        self.session = self
        self.reconnects = 0

    def reconnect(self) -> None:
        self.reconnects += 1

    def tail(
        self,
        offset: int,
        sink: Callable[[bytes], Any],
        *,
        follow: bool = False,
        for_s: float | None = None,
        on_beat: Callable[[Any], Any] | None = None,
    ) -> int:
        self.offsets.append(offset)
        if not follow:  # the last bytes, once the training has ended
            sink(self.log[offset:])
            return 0
        step = self.rounds.pop(0)
        if isinstance(step, Exception):
            sink(self.log[offset : offset + 3])  # part of it came before the drop
            raise step
        sink(self.log[offset:step])
        if not self.rounds:
            self.status_now = {"running": False, "exit_code": 0}
        return 0

    def status(self) -> dict[str, Any]:
        return self.status_now


def test_the_follower_masks_secrets_across_rounds_and_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.sleep", lambda s: None)
    log = b"epoch 1 token=hunter2 ok\nepoch 2 hunter2\nend hunt"
    split = log.index(b"hunter2") + 3  # the first round ends inside the secret
    agent = ScriptedAgent(log, [split, RemoteError("dropped", reason="reset"), len(log) - 3])
    got = bytearray()
    follower = LogFollower(agent, 0, got.extend, secrets=["hunter2"], lost=lambda: None, reconnects=3)  # type: ignore[arg-type]
    assert follower.follow(round_s=0.01) == 0
    assert bytes(got) == log.replace(b"hunter2", b"*******")
    assert follower.offset == len(got)
    assert agent.reconnects == 1
    assert agent.offsets[1] == split - 3  # what was held back is asked for again


def test_the_follower_raises_what_lost_says_when_the_instance_is_gone() -> None:
    agent = ScriptedAgent(b"epoch 1\n", [RemoteError("dropped", reason="reset")])
    lost = InstanceLost("i-0123", "terminated")
    follower = LogFollower(agent, 0, lambda data: None, secrets=[], lost=lambda: lost, reconnects=3)  # type: ignore[arg-type]
    with pytest.raises(InstanceLost) as caught:
        follower.follow(round_s=0.01)
    assert caught.value is lost and agent.reconnects == 0


def test_the_follower_gives_up_after_its_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.sleep", lambda s: None)
    drops = [RemoteError(f"drop {n}", reason="reset") for n in range(3)]
    agent = ScriptedAgent(b"epoch 1\n", list(drops))
    heard: list[str] = []
    follower = LogFollower(
        agent,
        0,
        lambda data: None,
        secrets=[],
        lost=lambda: None,
        reconnects=2,
        on_drop=lambda e: heard.append(e.message),  # type: ignore[arg-type]
    )
    with pytest.raises(RemoteError, match="drop 2"):
        follower.follow(round_s=0.01)
    assert heard == ["drop 0", "drop 1"] and agent.reconnects == 2


def test_a_supervisor_gone_with_its_instance_is_the_instance_lost() -> None:
    """A spot instance shutting down kills the supervisor before SSH goes: the follower
    says the instance was lost (run relaunches, logs -f waits), not that training broke."""
    agent = ScriptedAgent(b"epoch 1\n", [8])
    agent.status = lambda: {"running": False, "exit_code": None}  # type: ignore[method-assign]
    lost = InstanceLost("i-0123", "shutting-down")
    follower = LogFollower(agent, 0, lambda data: None, secrets=[], lost=lambda: lost, reconnects=3)  # type: ignore[arg-type]
    with pytest.raises(InstanceLost):
        follower.follow(round_s=0.01)
    alive = LogFollower(agent, 0, lambda data: None, secrets=[], lost=lambda: None, reconnects=3)  # type: ignore[arg-type]
    agent.rounds[:] = [8]
    with pytest.raises(RemoteError, match="supervisor on the instance is gone"):
        alive.follow(round_s=0.01)


def test_each_node_hears_the_cluster_and_only_the_chief_keeps_checkpoints_in_s3() -> None:
    from cloudtrain.cluster import node_environment
    from cloudtrain.spec import JobSpec

    spec = JobSpec.model_validate(
        {"name": "j", "run": "python train.py", "keras": 2, "checkpoint": {"s3": "s3://my-bucket/ckpt/"}}
    )
    addresses = ["10.0.0.5", "10.0.0.6"]
    chief, worker = (
        AgentConfig.from_spec(
            spec, "run-1", "us-east-1", gpus=1, node=node_environment("run-1", rank, addresses)
        )
        for rank in (0, 1)
    )
    assert chief.env["CLOUDTRAIN_NODE_RANK"] == "0" and worker.env["CLOUDTRAIN_NODE_RANK"] == "1"
    assert worker.env["CLOUDTRAIN_NUM_NODES"] == "2" and worker.env["CLOUDTRAIN_GPUS_PER_NODE"] == "1"
    assert chief.checkpoint_s3 == "s3://my-bucket/ckpt/run-1/" and worker.checkpoint_s3 is None


def test_the_job_hears_its_instance_types_gpu_count() -> None:
    from cloudtrain.spec import JobSpec

    spec = JobSpec.model_validate({"name": "j", "run": "python train.py", "env": {"MINE": "1"}})
    config = AgentConfig.from_spec(spec, "run-1", "us-east-1", gpus=4)
    assert dict(config.env) == {"CLOUDTRAIN_GPUS_PER_NODE": "4", "MINE": "1"}
    assert dict(AgentConfig.from_spec(spec, "run-1", "us-east-1").env) == dict(
        spec.env
    )  # no count, no variable
