"""The controller's side of the on-instance agent: the only module that knows its command
lines and its reports.

The agent (``cloudtrain/agent``, uploaded as ``cloudtrain_agent``) runs on the instance in
the job's environment. Every command that starts it is built here, each argument quoted
once: `AgentCli` makes the command lines (the pipes of sync and pull stream through the
ones it makes for ``receive`` and ``pack``), `RemoteAgent` runs them over a Session with
typed methods, and `follow_log` streams the run's log through drops, secrets masked, for
``run``, ``attach`` and ``logs -f`` alike. `AgentConfig` is the job's options for the
agent, built once from the job file. The agent parses its side in ``agent/cli.py``.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudtrain.cluster import NODE_RANK_ENV
from cloudtrain.errors import RemoteError

if TYPE_CHECKING:
    from cloudtrain.remote.session import Session
    from cloudtrain.spec import JobSpec

# The instance's layout, relative to the login user's HOME.
REMOTE_AGENT = ".cloudtrain/agent"  # the agent package's parent (its PYTHONPATH)
REMOTE_RUN_DIR = ".cloudtrain/run"  # env.json, train.log, state.json, exit_code
REMOTE_WORKDIR = "work"  # the synced workdir
REMOTE_CHECKPOINT = ".cloudtrain/checkpoint"  # the fit checkpoints (see recovery.py)
FOLLOW_ROUND_S = 15.0  # the log is followed this long at a time: a budget check comes between
IMAGE_ROOT = "${CLOUDTRAIN_ROOT:-/opt/cloudtrain}"  # the image's prefix, expanded there

log = logging.getLogger(__name__)


# ("name", value): None or False leave it out, True is a flag, a list is one option's
# values (argparse's nargs).
Option = tuple[str, Any]


class Shell(str):
    """A word used in a command line as given: a shell expression the instance expands."""


def remote_path(path: str) -> str:
    """A remote path for the shell: quoted, with a leading ``~/`` or ``$HOME/`` still expanded."""
    for lead in ("~/", "$HOME/"):
        if path.startswith(lead):
            rest = path[len(lead) :]
            return '"$HOME"/' + shlex.quote(rest) if rest else '"$HOME"'
    return shlex.quote(path)


def _word(value: object) -> str:
    return str(value) if isinstance(value, Shell) else shlex.quote(str(value))


def home(path: str) -> Shell:
    """``path`` relative to the login user's HOME, for the shell."""
    return Shell(remote_path(f"$HOME/{path}"))


def job_python(backend: str) -> Shell:
    """The job environment's interpreter on the instance (the image's layout)."""
    return Shell(f'"{IMAGE_ROOT}/envs/{backend}/bin/python"')


def agent_source() -> Path:
    """The agent package's folder here, as uploaded to the instance."""
    return Path(str(files("cloudtrain.agent")))


@dataclass(frozen=True)
class AgentCli:
    """The agent's command lines for one interpreter and one place of the agent package.

    ``python`` and ``path`` are shell words used as given (``$HOME/...`` expands remotely);
    ``path`` None: the agent is importable without a PYTHONPATH."""

    python: str = "python3"
    path: str | None = f"$HOME/{REMOTE_AGENT}"

    @classmethod
    def for_backend(cls, backend: str) -> AgentCli:
        return cls(job_python(backend))

    def command(self, command: str, *options: Option) -> str:
        """``cloudtrain_agent COMMAND OPTION...`` in the job environment."""
        return self._line(["-m", "cloudtrain_agent", command], options)

    def module(self, module: str, *options: Option) -> str:
        """``python -S -m cloudtrain_agent.MODULE OPTION...``: the stream ends of sync and pull.

        ``-S``: they are standard library only, and skipping ``site`` saves a tenth of
        their start-up."""
        return self._line(["-S", "-m", f"cloudtrain_agent.{module}"], options)

    def _line(self, start: list[str], options: Iterable[Option]) -> str:
        words = [f"PYTHONPATH={self.path}"] if self.path else []
        words += [self.python, *start]
        for name, value in options:
            if value is None or value is False:
                continue
            if value is True:
                words.append(f"--{name}")
            elif isinstance(value, list):  # one option, several values (argparse's nargs)
                words += [f"--{name}", *map(_word, value)]
            else:
                words += [f"--{name}", _word(value)]
        return " ".join(words)

    # --- sync and pull: the stream ends ---------------------------------------------------

    def receive(
        self, dest: str, *, fsync: bool = False, print_manifest: bool = False, handshake: bool = False
    ) -> str:
        """The receiver of a push into ``dest`` (its manifest alone with ``print_manifest``)."""
        return self.module(
            "receive",
            ("dest", Shell(remote_path(dest))),
            ("fsync", fsync),
            ("print-manifest", print_manifest),
            ("handshake", handshake),
        )

    def pack(self, root: str, paths: Sequence[str], *, max_bytes: int, checkpoint: bool = False) -> str:
        """The sender of a pull of ``paths`` under ``root`` (the latest save alone with ``checkpoint``)."""
        return self.module(
            "pack",
            ("root", Shell(remote_path(root))),
            ("max-bytes", int(max_bytes)),
            ("checkpoint", checkpoint),
            ("paths", list(paths)),
        )


GPUS_PER_NODE_ENV = "CLOUDTRAIN_GPUS_PER_NODE"


@dataclass(frozen=True)
class AgentConfig:
    """The job's options for the agent's ``backend`` command, built once from the job file."""

    backend: str
    seed: int | None = None
    keras: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    checkpoint_every: int = 1
    checkpoint_s3: str | None = None  # the run's S3 prefix for checkpoints
    region: str | None = None  # for S3

    @classmethod
    def from_spec(
        cls,
        spec: JobSpec,
        run_id: str,
        region: str,
        *,
        gpus: int | None = None,
        node: Mapping[str, str] | None = None,
    ) -> AgentConfig:
        """``gpus``: the instance type's GPU count, for the job as CLOUDTRAIN_GPUS_PER_NODE
        (also in a dry-run, whose simulated instance has none: a script can split the CPU
        into as many devices, and mirror across as many replicas as the real run would).
        ``node``: a node's cluster variables (cluster.node_environment) in a run on several;
        only the chief (rank 0) keeps checkpoints in S3."""
        chief = (node or {}).get(NODE_RANK_ENV, "0") == "0"
        url = spec.checkpoint.s3_url(run_id) if chief else None
        ours = {**(node or {}), **({GPUS_PER_NODE_ENV: str(gpus)} if gpus is not None else {})}
        return cls(
            backend=spec.backend,
            seed=spec.seed,
            keras=spec.keras,
            env={**spec.env, **ours},  # the spec refuses CLOUDTRAIN_* names in env and secrets
            checkpoint_every=spec.checkpoint.every_epochs,
            checkpoint_s3=url,
            region=region if url else None,
        )


class RemoteAgent:
    """The agent on one instance, over ``session``, in ``backend``'s job environment.

    ``run_dir`` is the run's folder there (``image build`` verifies each environment in
    its own). Each method runs one agent command; a report is the JSON object it printed,
    with ``error`` set when it failed."""

    def __init__(self, session: Session, backend: str, run_dir: str = REMOTE_RUN_DIR) -> None:
        self.session = session
        self.backend = backend
        self.run_dir = run_dir
        self.cli = AgentCli.for_backend(backend)

    def install(self) -> None:
        """Upload the agent package (replacing any earlier copy)."""
        from cloudtrain.remote.sync import upload_tree

        upload_tree(self.session, agent_source(), f"{REMOTE_AGENT}/cloudtrain_agent")

    def configure(self, config: AgentConfig | None = None, *, gpu: str = "auto") -> None:
        """The backend's keras.json, .theanorc and the run's env.json (no job options without
        ``config``: ``image build``). ``gpu``: auto, yes or no (no where the instances have none)."""
        path = Shell(f'"PATH={IMAGE_ROOT}/envs/{self.backend}/bin:$PATH"')
        job: list[Option] = []
        if config is not None:
            theano = self.backend == "theano"  # its compile folder starts as a copy of the image's warm one
            job = [
                ("seed", config.seed),
                ("keras", config.keras),
                ("compile-cache", Shell(f'"{IMAGE_ROOT}/theano-cache"') if theano else None),
                ("checkpoint-dir", home(REMOTE_CHECKPOINT)),
                ("checkpoint-every", config.checkpoint_every),
                ("checkpoint-s3", config.checkpoint_s3),
                ("region", config.region),
                *(("env", f"{key}={value}") for key, value in config.env.items()),
            ]
        command = self.cli.command(
            "backend",
            ("backend", self.backend),
            ("home", Shell("$HOME")),
            ("run-dir", self.run_dir),
            ("gpu", gpu),
            ("env", path),
            *job,
        )
        self.session.run(f"mkdir -p {shlex.quote(self.run_dir)} && {command}")

    def verify(self, keras: int | None = None, *, expect_gpu: bool = False) -> dict[str, Any]:
        """Import Keras in the job environment with the run's env.json and check the backend."""
        return self.report(
            "verify",
            ("backend", self.backend),
            ("python", self.cli.python),
            ("env-file", f"{self.run_dir}/env.json"),
            ("keras", keras),
            ("expect-gpu", expect_gpu),
        )

    def start(self, run: str, setup: str | None, secrets: Mapping[str, str]) -> None:
        """Run ``setup`` then ``run`` in the workdir, detached; the secrets go on stdin."""
        self.session.run(
            self.cli.command(
                "start",
                ("run-dir", self.run_dir),
                ("workdir", REMOTE_WORKDIR),
                ("run", run),
                ("setup", setup or None),  # an empty one is none
                ("env-file", f"{self.run_dir}/env.json"),
            ),
            stdin=json.dumps(dict(secrets)).encode(),
        )

    def status(self) -> dict[str, Any]:
        """Where the training stands: ``running``, ``exit_code`` (None while it runs)."""
        return json_report(self.session.run(self.cli.command("status", ("run-dir", self.run_dir))).text)

    def tail(
        self,
        offset: int,
        sink: Callable[[bytes], Any],
        *,
        follow: bool = False,
        for_s: float | None = None,
        on_beat: Callable[[Beat], Any] | None = None,
    ) -> int:
        """Stream the log from byte ``offset`` into ``sink`` (with ``follow``, as it grows, for
        ``for_s`` or until the training ends); the command's exit code. With ``on_beat``, a
        following tail also reports the run's idle time and progress every 2 s."""
        beats = None if on_beat is None else _BeatReader(on_beat)
        return self.session.stream(
            self.cli.command(
                "tail",
                ("run-dir", self.run_dir),
                ("offset", offset),
                ("follow", follow),
                ("for", for_s),
                ("progress", follow and beats is not None),
            ),
            sink,
            errors=None if beats is None else beats.feed,
        )

    def metrics(self, offset: int) -> bytes:
        """The metrics file's complete lines from byte ``offset`` (a line still being written
        is left for the next call)."""
        got = self.session.run(
            self.cli.command("metrics", ("run-dir", self.run_dir), ("offset", offset))
        ).stdout
        return got[: got.rfind(b"\n") + 1]

    def watchdog(
        self,
        deadline: str,
        grace_s: float,
        outputs: Sequence[str],
        s3: str | None,
        region: str | None,
        *,
        max_idle_s: float | None = None,
        on_idle: str = "stop",
    ) -> None:
        """Start the instance's own guard (agent/watchdog.py): it powers off at ``deadline``, or
        when nobody collects the ended run within ``grace_s``; it stops a job stalled for
        ``max_idle_s`` (and a margin) inside a Keras call that no controller stopped."""
        self.session.run(
            self.cli.command(
                "watchdog",
                ("run-dir", self.run_dir),
                ("workdir", REMOTE_WORKDIR),
                ("deadline", deadline),
                ("grace", grace_s),
                *(("output", path) for path in outputs),
                ("s3", s3),
                ("region", region if s3 else None),
                ("max-idle", max_idle_s),
                ("on-idle", on_idle),
            )
        )

    def renew(self, deadline: str) -> None:
        """Move the run's deadline to ``deadline`` (agent/watchdog.py)."""
        self.session.run(self.cli.command("renew", ("run-dir", self.run_dir), ("deadline", deadline)))

    def collected(self, keep_until: str | None = None) -> None:
        """The outputs are home: the watchdog's grace starts again (with ``keep_until``, the
        instance stays until then)."""
        self.session.run(self.cli.command("collected", ("run-dir", self.run_dir), ("keep-until", keep_until)))

    def fetch_s3(self, src: str, dst: str, region: str) -> dict[str, Any]:
        """Fetch an S3 prefix into ``dst`` on the instance, with its instance profile."""
        return self.report("fetch-s3", ("src", src), ("dst", dst), ("region", region))

    def restore_checkpoint(self, url: str, region: str) -> dict[str, Any]:
        """Bring the checkpoint in S3 at ``url`` into the checkpoint folder when it is further on."""
        return self.report(
            "checkpoint-s3", ("url", url), ("dir", home(REMOTE_CHECKPOINT)), ("region", region)
        )

    def report(self, command: str, *options: Option) -> dict[str, Any]:
        """Run an agent command that prints one JSON object; its report, with ``error`` set
        when the command failed (the agent's own message, else its output)."""
        result = self.session.run(self.cli.command(command, *options), check=False)
        report = json_report(result.text)
        if result.exit_code != 0 and "error" not in report:
            report["error"] = result.text.strip()[-500:] or f"exit code {result.exit_code}"
        return report


@dataclass(frozen=True)
class Beat:
    """A following tail's heartbeat (agent/logtail.py): seconds since the run's log or its
    progress last changed (None before either exists), and progress.json (None before a
    hooked Keras call): ``call``, ``active``, ``fit``, ``epoch``, ``epochs``, ``done``,
    ``step``, ``steps``, ``epoch_elapsed_s``, ``epoch_s``, ``logs``, ``at``."""

    idle_s: float | None
    progress: Mapping[str, Any] | None


class _BeatReader:
    """Heartbeat lines from a tail's stderr, which may arrive cut anywhere; anything else
    there (a warning, a traceback) is logged."""

    def __init__(self, on_beat: Callable[[Beat], Any]) -> None:
        self.on_beat = on_beat
        self.partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            try:
                beat = json.loads(line)
                idle_s, progress = beat["idle_s"], beat["progress"]
            except (ValueError, KeyError, TypeError):
                log.info("agent tail: %s", line.decode("utf-8", "replace"))
                continue
            self.on_beat(
                Beat(
                    float(idle_s) if isinstance(idle_s, (int, float)) else None,
                    progress if isinstance(progress, dict) else None,
                )
            )


def json_report(text: str) -> dict[str, Any]:
    """The last JSON object the agent printed, else ``{"error": <the output's tail>}``."""
    for line in reversed(text.strip().splitlines()):
        with suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return {"error": text.strip()[-500:] or "no output"}


class LogFollower:
    """The run's log streamed from the instance through drops, secrets masked.

    ``offset`` counts the bytes of this instance's log already passed on. A drop
    reconnects (up to ``reconnects`` times, backing off), unless ``lost`` says the
    instance is gone: its exception is raised then. ``on_beat`` gets the tail's heartbeats
    (every 2 s while it follows). The same for ``run``, ``attach`` and ``logs -f``."""

    def __init__(
        self,
        agent: RemoteAgent,
        offset: int,
        sink: Callable[[bytes], Any],
        *,
        secrets: Iterable[str],
        lost: Callable[[], BaseException | None],
        reconnects: int,
        on_drop: Callable[[RemoteError], Any] = lambda error: None,
        on_beat: Callable[[Beat], Any] | None = None,
    ) -> None:
        self.agent = agent
        self.on_beat = on_beat
        self.offset = offset
        self.sink = sink
        self.secrets = tuple(secrets)
        self.lost = lost
        self.reconnects = reconnects
        self.on_drop = on_drop

    def follow(self, round_s: float = FOLLOW_ROUND_S, between: Callable[[], Any] = lambda: None) -> int:
        """Follow until the training ends; its exit code. ``between`` runs before each round
        of ``round_s`` (a budget check)."""
        from cloudtrain.agent.redact import LogRedactor

        drops = 0
        while True:
            between()
            redactor = LogRedactor(self.secrets)  # each round resends what the last held back
            masked = partial(self._pass, redactor.feed)
            try:
                self.agent.tail(self.offset, masked, follow=True, for_s=round_s, on_beat=self.on_beat)
                status = self.agent.status()
            except RemoteError as e:
                lost = self.lost()
                if lost is not None:
                    raise lost from e
                drops += 1
                if drops > self.reconnects:
                    raise
                self.on_drop(e)
                time.sleep(min(2**drops, 15))
                with suppress(RemoteError):
                    self.agent.session.reconnect()
                continue
            if status.get("exit_code") is not None:
                with suppress(RemoteError):  # else the caller's pull-back brings them
                    self._last_bytes()
                return int(status["exit_code"])
            if not status.get("running"):
                lost = self.lost()  # an instance being taken away takes its supervisor first
                if lost is not None:
                    raise lost
                raise RemoteError(
                    "the training supervisor on the instance is gone without an exit code",
                    hint=f"See {REMOTE_RUN_DIR}/supervisor.log on the instance (`--keep` keeps it).",
                )

    def _pass(self, mask: Callable[[bytes], bytes], data: bytes) -> None:
        data = mask(data)  # a part of a secret held back is not counted yet
        self.offset += len(data)
        self.sink(data)

    def _last_bytes(self) -> None:
        """The ended training's log from the offset to its end, nothing held back."""
        from cloudtrain.agent.redact import LogRedactor

        redactor = LogRedactor(self.secrets)
        self.agent.tail(self.offset, partial(self._pass, redactor.feed))
        self._pass(lambda _: redactor.flush(), b"")
