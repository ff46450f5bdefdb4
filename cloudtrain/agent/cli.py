"""The agent's command line: parse arguments, call one module, print one JSON object.

Exit statuses: 0 success, 2 bad usage, 3 failure. Errors are printed as
`{"error": ..., "hint": ...}` on stdout, except for `tail` and `metrics` (whose stdout
is the raw log, the raw metrics lines), which print them on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any, NoReturn

from . import AGENT_VERSION
from .errors import FAILURE, USAGE, AgentError

RAW_OUTPUT = ("tail", "metrics")  # stdout is the bytes asked for; errors go to stderr


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise AgentError(f"{self.prog}: {message}", f"Run `{self.prog} --help`.", USAGE)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cloudtrain_agent", description="cloudtrain's on-instance agent")
    parser.add_argument("--version", action="version", version=AGENT_VERSION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backend", help="write keras.json, .theanorc and the run's env.json")
    p.add_argument("--backend", required=True, choices=["tensorflow", "theano"])
    p.add_argument("--home", required=True, help="the run's HOME (keras.json goes to HOME/.keras)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--gpu", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--seed", type=int)
    p.add_argument("--keras", type=int, choices=[2, 3])
    p.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="theano: the image's warmed compile cache; HOME/.theano starts as a copy of it",
    )
    p.add_argument("--env", action="append", type=_env_pair, default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="fit checkpoints into DIR and resumes from the checkpoint there (see checkpoint.py)",
    )
    p.add_argument("--checkpoint-every", type=int, default=1, metavar="N", help="save every N epochs")
    p.add_argument(
        "--notice-file",
        metavar="PATH",
        help="the spot interruption notice that makes fit save at once (default RUN_DIR/notice.json)",
    )
    p.add_argument("--checkpoint-s3", metavar="URL", help="also put each checkpoint under this S3 URL")
    p.add_argument("--region", help="the S3 region, when the environment names none")

    p = sub.add_parser("verify", help="import Keras in the job's environment and check the backend")
    p.add_argument("--backend", required=True, choices=["tensorflow", "theano"])
    p.add_argument("--python", required=True, help="the job environment's interpreter")
    p.add_argument("--expect-gpu", action="store_true")
    p.add_argument("--env-file")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--keras", type=int, choices=[2, 3], help="the Keras major version the job wants")

    p = sub.add_parser("start", help="run setup and the training command, detached; secrets on stdin")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--setup")
    p.add_argument("--env-file")

    p = sub.add_parser("status", help="where the run stands")
    p.add_argument("--run-dir", required=True)

    p = sub.add_parser("tail", help="the log's bytes from an offset")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--follow", action="store_true")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between polls (at most 0.2)")
    p.add_argument("--for", dest="for_s", type=float, help="with --follow: stop following after this long")
    p.add_argument(
        "--progress",
        action="store_true",
        help="with --follow: a JSON line on stderr every 2 s: the run's idle seconds and progress.json",
    )

    p = sub.add_parser("metrics", help="the metrics file's lines from a byte offset (raw, as tail)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--offset", type=int, default=0)

    p = sub.add_parser("stop", help="SIGTERM the run's process group, SIGKILL after the grace")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--grace", type=float, default=10.0)

    p = sub.add_parser("fetch-s3", help="fetch an S3 prefix into a folder (instance profile credentials)")
    p.add_argument("--src", required=True, help="s3://bucket/prefix/")
    p.add_argument("--dst", required=True, help="the folder to fetch into")
    p.add_argument("--region", help="used when the environment names no region")

    p = sub.add_parser(
        "checkpoint-s3", help="bring the S3 checkpoint into DIR when it is further on than DIR's"
    )
    p.add_argument("--url", required=True, help="s3://bucket/prefix/<run-id>/")
    p.add_argument("--dir", required=True, help="the run's checkpoint folder")
    p.add_argument("--region", help="used when the environment names no region")

    p = sub.add_parser("watchdog", help="start the watchdog that powers the instance off (see watchdog.py)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--deadline", required=True, help="ISO UTC: power off then, whatever happens")
    p.add_argument("--grace", type=float, default=1800.0, help="seconds an ended run waits to be collected")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", action="append", default=[], help="an output path, relative to the workdir")
    p.add_argument("--s3", help="the run's S3 prefix: outputs and log go there before a power-off")
    p.add_argument("--region")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between checks")
    p.add_argument("--max-idle", type=float, help="seconds without progress inside fit/evaluate/predict")
    p.add_argument("--on-idle", choices=["stop", "warn"], default="stop")

    p = sub.add_parser("renew", help="move the run's deadline (a controller follows it)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--deadline", required=True, help="ISO UTC: the new deadline")

    p = sub.add_parser("collected", help="record that the controller has collected the outputs")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--keep-until", help="ISO UTC: --keep, the instance stays until then")

    p = sub.add_parser("poweroff", help="power the instance off (through the hook if there is one)")
    p.add_argument("--reason", default="")
    return parser


def _read_secrets() -> str:
    stdin = sys.stdin
    if stdin is None or stdin.isatty():
        return ""
    return stdin.buffer.read().decode("utf-8", "replace")


def dispatch(args: argparse.Namespace) -> dict[str, Any] | None:
    command = args.command
    if command == "backend":
        from .backend import configure

        return configure(
            args.backend,
            args.home,
            args.run_dir,
            args.gpu,
            args.seed,
            args.keras,
            dict(args.env),
            compile_cache=args.compile_cache,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            notice_file=args.notice_file,
            checkpoint_s3=args.checkpoint_s3,
            region=args.region,
        )
    if command == "verify":
        from .verify import verify

        return verify(args.backend, args.python, args.expect_gpu, args.env_file, args.timeout, args.keras)
    if command == "start":
        from .environ import parse_secrets
        from .supervisor import start

        secrets = parse_secrets(_read_secrets())
        return start(args.run_dir, args.workdir, args.run, args.setup, args.env_file, secrets)
    if command == "status":
        from .status import status

        return status(args.run_dir)
    if command == "tail":
        from .logtail import tail

        beats = sys.stderr if args.progress else None
        tail(args.run_dir, sys.stdout.buffer, args.offset, args.follow, args.poll, args.for_s, beats)
        return None
    if command == "metrics":
        from .logtail import metrics

        metrics(args.run_dir, sys.stdout.buffer, args.offset)
        return None
    if command == "stop":
        from .stop import stop

        return stop(args.run_dir, args.grace)
    if command == "fetch-s3":
        from .fetch_s3 import fetch

        return fetch(args.src, args.dst, args.region)
    if command == "checkpoint-s3":
        from .s3_checkpoint import restore

        return restore(args.url, args.dir, args.region)
    if command == "watchdog":
        from .watchdog import start as start_watchdog

        return start_watchdog(
            args.run_dir,
            args.deadline,
            args.grace,
            args.workdir,
            args.output,
            args.s3,
            args.region,
            args.poll,
            args.max_idle,
            args.on_idle,
        )
    if command == "renew":
        from .watchdog import renew

        return renew(args.run_dir, args.deadline)
    if command == "collected":
        from .watchdog import collected

        return collected(args.run_dir, args.keep_until)
    if command == "poweroff":
        from .power import poweroff

        return poweroff(args.reason)
    raise AgentError(f"unknown command {command!r}", "", USAGE)


def _emit(obj: object, stream: Any) -> None:
    stream.write(json.dumps(obj, sort_keys=True) + "\n")
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        result = dispatch(args)
        if result is not None:
            _emit(result, sys.stdout)
        return 0
    except AgentError as e:
        _emit(e.to_json(), sys.stderr if command in RAW_OUTPUT else sys.stdout)
        return e.exit_code
    except BrokenPipeError:
        # The reader went away (a dropped SSH connection): nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        error = {
            "error": f"internal error: {type(e).__name__}: {e}",
            "hint": "This is a bug in cloudtrain's agent; the traceback is on stderr.",
        }
        traceback.print_exc()
        _emit(error, sys.stderr if command in RAW_OUTPUT else sys.stdout)
        return FAILURE
