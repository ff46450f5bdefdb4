"""Shared fixtures. No test reaches real AWS or the internet: fake credentials, a
private CLOUDTRAIN_HOME, and no profile or config file from the developer's machine."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudtrain.permissions import RECORD_ENV, operation_keys
from cloudtrain.settings import Settings

# Every AWS operation cloudtrain's code calls in this suite, in this process and in every
# `cloudtrain` process a test starts (they inherit the variable): one not in
# permissions.OPERATIONS, the list `cloudtrain iam-policy` is made of, fails the session.
OPERATIONS_SEEN = Path(tempfile.mkdtemp(prefix="cloudtrain-aws-operations-")) / "seen.txt"
os.environ[RECORD_ENV] = str(OPERATIONS_SEEN)


def operations_seen() -> set[str]:
    try:
        return set(OPERATIONS_SEEN.read_text().split())
    except FileNotFoundError:
        return set()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if operations_seen() - operation_keys() and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    seen = operations_seen()
    unlisted, unseen = sorted(seen - operation_keys()), sorted(operation_keys() - seen)
    terminalreporter.section("AWS operations (cloudtrain/permissions.py)")
    terminalreporter.line(f"{len(seen)} operations called by cloudtrain's code in this session")
    if unlisted:
        terminalreporter.line(
            "FAILED: called but not in permissions.OPERATIONS (so not in `cloudtrain iam-policy`): "
            + ", ".join(unlisted),
            red=True,
        )
    if unseen and len(unseen) <= 10:
        terminalreporter.line("listed but never called in this session: " + ", ".join(unseen))
    elif unseen:
        terminalreporter.line(f"{len(unseen)} listed operations never called (a part of the suite ran)")


# A suite started in the background (`cmd &` without job control) inherits SIGINT ignored, and
# so would every process it starts: the Ctrl-C tests would then fail, or test nothing.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def signal_handlers_restored() -> Iterator[None]:
    """The CLI run in this process ignores SIGINT on its way out after a Ctrl-C (so that a
    second one cannot turn exit 130 into a death by the signal) and sets a SIGTERM handler:
    right for a process about to exit, but no test may leave that to the next, whose
    Ctrl-C would then do nothing (nor in the processes it starts)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def output_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI honours COLUMNS, and pytest imports readline, which (GNU readline) puts
    COLUMNS=80 into the process's C environment, not into os.environ: every CLI a test
    started saw 80 columns. Each test sets 120, what a pipe gets without COLUMNS; a test
    that wants another width passes it (test_cli.shown)."""
    monkeypatch.setenv("COLUMNS", "120")


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Fake credentials and an isolated home for every test."""
    for var in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "CLOUDTRAIN_SSH_CIDR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKEFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-never-leaves-this-machine")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CLOUDTRAIN_HOME", str(tmp_path / "cloudtrain-home"))
    monkeypatch.setenv("CLOUDTRAIN_OWNER", "tester@testhost")
    monkeypatch.setenv("CLOUDTRAIN_TESTING", "1")  # the agent refuses a real poweroff
    monkeypatch.setenv("CLOUDTRAIN_SIM_IDLE_S", "300")
    yield
    # A simulator a test started (run --dry-run) never outlives the test.
    from cloudtrain.cloud.simulator import stop_simulator

    stop_simulator(Settings.from_env())


@pytest.fixture(autouse=True)
def aws_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every AWS call a test makes in this process keeps to AWS's limits (aws_contract.py),
    which moto does not apply."""
    from aws_contract import install

    install(monkeypatch)


@pytest.fixture
def settings(fake_aws: None) -> Iterator[Settings]:
    yield Settings.from_env()
