"""Spot interruption notices: the simulated IMDS (real HTTP), the agent's IMDSv2 client
against it (under the controller's Python and Python 3.7, as a subprocess) and the
supervisor's watcher writing RUN_DIR/notice.json while a job runs.

Every client here dials a loopback server; none ever tries 169.254.169.254.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import needs
import pytest

from cloudtrain.cloud.simhost import SimImds

REPO = Path(__file__).resolve().parents[1]
AGENT_SRC = REPO / "cloudtrain" / "agent"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
ACTION = "/latest/meta-data/spot/instance-action"
REBALANCE = "/latest/meta-data/events/recommendations/rebalance"


@pytest.fixture
def imds() -> Iterator[SimImds]:
    server = SimImds("i-0123456789abcdef0")
    server.start()
    yield server
    server.stop()


def call(
    imds: SimImds, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of one raw HTTP request."""
    request = urllib.request.Request(imds.endpoint + path, method=method, headers=headers or {})
    if method == "PUT":
        request.data = b""
    try:
        with OPENER.open(request, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode(), dict(e.headers)


def token(imds: SimImds, ttl: str = "60") -> str:
    status, body, headers = call(imds, "/latest/api/token", "PUT", {TTL: ttl})
    assert status == 200 and headers[TTL] == ttl and headers["Content-Type"] == "text/plain"
    return body


def closed_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def at(seconds: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the simulated IMDS, spoken to in raw HTTP ---------------------------------------------------


def test_token_flow_and_status_codes(imds: SimImds) -> None:
    assert call(imds, "/latest/meta-data/instance-id")[0] == 401  # IMDSv2 only: no token, no data
    assert call(imds, "/latest/meta-data/instance-id", headers={TOKEN: "made-up"})[0] == 401
    assert call(imds, "/latest/api/token", "PUT")[0] == 400  # the TTL header is required
    for bad in ("0", "21601", "abc", "-5"):
        assert call(imds, "/latest/api/token", "PUT", {TTL: bad})[0] == 400, bad
    assert call(imds, "/latest/api/token", "PUT", {TTL: "60", "X-Forwarded-For": "10.0.0.1"})[0] == 403
    assert call(imds, "/latest/api/token")[0] == 405  # the token is PUT, never GET

    auth = {TOKEN: token(imds, "21600")}
    status, body, headers = call(imds, "/latest/meta-data/instance-id", headers=auth)
    assert (status, body, headers["Content-Type"]) == (200, "i-0123456789abcdef0", "text/plain")
    status, body, headers = call(imds, ACTION, headers=auth)
    assert status == 404 and "404 - Not Found" in body and headers["Content-Type"] == "text/html"
    assert call(imds, REBALANCE, headers=auth)[0] == 404
    assert call(imds, "/latest/meta-data/spot/termination-time", headers=auth)[0] == 404
    assert call(imds, "/latest/meta-data/no-such-thing", headers=auth)[0] == 404

    when = at(120)
    imds.schedule_instance_action("terminate", when)
    status, body, headers = call(imds, ACTION, headers=auth)
    assert status == 200 and headers["Content-Type"] == "text/plain"
    assert json.loads(body) == {"action": "terminate", "time": iso(when)}
    assert call(imds, "/latest/meta-data/spot/termination-time", headers=auth)[1] == iso(when)
    assert call(imds, REBALANCE, headers=auth)[0] == 404  # independent of each other
    noticed = at(0)
    imds.recommend_rebalance(noticed)
    status, body, _ = call(imds, REBALANCE, headers=auth)
    assert status == 200 and json.loads(body) == {"noticeTime": iso(noticed)}
    assert call(imds, ACTION, headers={TOKEN: "made-up"})[0] == 401  # scheduled or not


def test_tokens_expire_after_their_ttl(imds: SimImds) -> None:
    short = token(imds, "1")
    assert call(imds, "/latest/meta-data/instance-id", headers={TOKEN: short})[0] == 200
    time.sleep(1.2)
    assert call(imds, "/latest/meta-data/instance-id", headers={TOKEN: short})[0] == 401


# --- the agent's client, run by the controller's Python and by Python 3.7 ----------------------

DRIVER = """
import json, sys
imds = __import__(sys.argv[1] + ".imds", fromlist=["imds"])
client = imds.ImdsClient(sys.argv[2], ttl_s=int(sys.argv[3]), timeout_s=float(sys.argv[4]))
for line in sys.stdin:
    if line.strip() == "poll":
        out = client.poll().to_json()
    else:
        try:
            out = {"instance_id": client.instance_id()}
        except imds.ImdsUnavailable as e:
            out = {"error": str(e)}
    sys.stdout.write(json.dumps(out) + "\\n")
    sys.stdout.flush()
"""


class Client:
    """The agent's ImdsClient in a subprocess, asked one question per line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd
        )

    def ask(self, question: str = "poll") -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(question.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read().decode() if self.proc.stderr else "no answer"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        with suppress(OSError):
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture(params=["current", "py37"])
def python(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, Path, dict[str, str]]:
    """(python, package name, cwd, env) to run the agent as the controller or the instance does."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if request.param == "current":
        return sys.executable, "cloudtrain.agent", REPO, dict(env, PYTHONPATH=str(REPO))
    python37 = needs.python37()
    where = tmp_path / "uploaded"
    shutil.copytree(AGENT_SRC, where / "cloudtrain_agent", ignore=shutil.ignore_patterns("__pycache__"))
    return python37, "cloudtrain_agent", where, env


@pytest.fixture
def make_client(python: tuple[str, str, Path, dict[str, str]]) -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(endpoint: str, ttl_s: int = 21600, timeout_s: float = 2.0) -> Client:
        exe, package, cwd, env = python
        argv = [exe, "-c", DRIVER, package, endpoint, str(ttl_s), str(timeout_s)]
        clients.append(Client(argv, env, cwd))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def test_client_sees_nothing_then_the_notice_then_the_rebalance(
    imds: SimImds, make_client: Callable[..., Client]
) -> None:
    client = make_client(imds.endpoint)
    assert client.ask() == {"instance_action": None, "rebalance": None, "error": None}
    assert client.ask("instance-id") == {"instance_id": "i-0123456789abcdef0"}
    when = at(120)
    imds.schedule_instance_action("terminate", when)
    assert client.ask() == {
        "instance_action": {"action": "terminate", "time": iso(when)},
        "rebalance": None,
        "error": None,
    }
    imds.recommend_rebalance(at(0))
    answer = client.ask()
    assert answer["instance_action"] == {"action": "terminate", "time": iso(when)}
    assert set(answer["rebalance"]) == {"noticeTime"} and answer["error"] is None
    # One token for all of it: cached, not fetched per request.
    assert [r for r in imds.requests if r[0] == "PUT"] == [("PUT", "/latest/api/token", 200)]
    assert all(code in (200, 404) for _, _, code in imds.requests)


def test_client_refetches_an_expired_token(imds: SimImds, make_client: Callable[..., Client]) -> None:
    client = make_client(imds.endpoint)
    assert client.ask()["error"] is None
    imds.expire_tokens()  # as if its TTL ran out while the client still holds it
    imds.schedule_instance_action("terminate", at(120))
    answer = client.ask()
    assert answer["error"] is None and answer["instance_action"]["action"] == "terminate"
    assert ("GET", ACTION, 401) in imds.requests  # it was refused once...
    assert [r for r in imds.requests if r[0] == "PUT"] == [
        ("PUT", "/latest/api/token", 200)
    ] * 2  # ...and renewed


def test_client_renews_its_token_before_the_ttl_runs_out(
    imds: SimImds, make_client: Callable[..., Client]
) -> None:
    client = make_client(imds.endpoint, ttl_s=2)
    assert client.ask()["error"] is None
    time.sleep(1.7)  # within the last quarter of the TTL: renewed before use
    assert client.ask()["error"] is None
    assert len([r for r in imds.requests if r[0] == "PUT"]) == 2
    assert not any(code == 401 for _, _, code in imds.requests)


def test_no_answer_is_unknown_never_no_notice(imds: SimImds, make_client: Callable[..., Client]) -> None:
    refused = make_client(f"http://127.0.0.1:{closed_port()}")
    answer = refused.ask()
    assert answer["instance_action"] is None and answer["error"] and "refused" in answer["error"].lower()
    assert "error" in refused.ask("instance-id")

    with closing(socket.socket()) as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = make_client(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        started = time.monotonic()
        answer = hung.ask()
        assert answer["error"] and "timed out" in answer["error"]
        assert time.monotonic() - started < 5  # short timeouts: the watcher keeps its rhythm

    client = make_client(imds.endpoint)
    assert client.ask()["error"] is None
    imds.stop()  # IMDS goes away between two polls
    answer = client.ask()
    assert answer["error"] and answer["instance_action"] is None


# --- the supervisor's watcher ---------------------------------------------------------------------

# A training stand-in: waits for the notice file its checkpoint hook would read, prints it.
JOB = """
import os, sys, time
path = os.environ["CLOUDTRAIN_NOTICE_FILE"]
print("training", flush=True)
end = time.time() + 30
while not os.path.exists(path) and time.time() < end:
    time.sleep(0.05)
print("checkpoint after " + open(path).read(), flush=True)
while not os.path.exists("finish") and time.time() < end:  # in the workdir
    time.sleep(0.05)
"""


def agent_json(python: tuple[str, str, Path, dict[str, str]], env: dict[str, str], *args: str) -> Any:
    exe, package, cwd, base = python
    proc = subprocess.run(
        [exe, "-m", package, *args], capture_output=True, cwd=cwd, env=dict(base, **env), timeout=30
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read(path: Path) -> dict[str, Any]:
    try:
        obj: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj


@pytest.fixture
def start_job(python: tuple[str, str, Path, dict[str, str]], tmp_path: Path) -> Iterator[Callable[..., Path]]:
    run_dirs: list[Path] = []

    def start(env: dict[str, str], *extra: str) -> Path:
        run_dir, work = tmp_path / f"run{len(run_dirs)}", tmp_path / "work"
        work.mkdir(exist_ok=True)
        run_dirs.append(run_dir)
        env = dict(env, HOME=str(tmp_path), CLOUDTRAIN_TESTING="1")
        command = f"{shlex.quote(python[0])} -c {shlex.quote(JOB)}"
        out = agent_json(
            python, env, "start", "--run-dir", str(run_dir), "--workdir", str(work), "--run", command, *extra
        )
        assert out["run_dir"] == str(run_dir)
        return run_dir

    yield start
    (tmp_path / "work" / "finish").touch()
    for run_dir in run_dirs:
        state = read(run_dir / "state.json")
        for key, kill in (("pgid", os.killpg), ("supervisor_pid", os.kill)):
            if isinstance(state.get(key), int) and state[key] > 1 and state.get("phase") != "done":
                with suppress(OSError):
                    kill(state[key], signal.SIGKILL)


POLL_S = 0.3


def test_a_notice_reaches_notice_json_within_a_poll(
    imds: SimImds,
    python: tuple[str, str, Path, dict[str, str]],
    start_job: Callable[..., Path],
    tmp_path: Path,
) -> None:
    env = {"CLOUDTRAIN_IMDS_ENDPOINT": imds.endpoint, "CLOUDTRAIN_IMDS_POLL_S": str(POLL_S)}
    # The checkpoint hook's notice file, as `backend --notice-file` names it in env.json.
    hooks = tmp_path / "checkpoints" / "notice.json"
    hooks.parent.mkdir()
    (tmp_path / "env.json").write_text(json.dumps({"CLOUDTRAIN_NOTICE_FILE": str(hooks)}))
    run_dir = start_job(env, "--env-file", str(tmp_path / "env.json"))
    notice = run_dir / "notice.json"
    wait_for(lambda: b"training" in (run_dir / "train.log").read_bytes(), 20, "the job to start")
    wait_for(lambda: ("GET", ACTION, 404) in imds.requests, 10, "a first poll")
    assert not notice.exists()

    imds.recommend_rebalance(at(0))
    wait_for(notice.exists, POLL_S + 3, "notice.json of the rebalance")
    first = read(notice)
    assert first["kind"] == "rebalance" and first["action"] is None and first["time"] and first["seen_at"]

    when = at(120)
    imds.schedule_instance_action("terminate", when)  # a spot notice supersedes a rebalance
    wait_for(lambda: read(notice).get("kind") == "spot-interruption", POLL_S + 3, "the spot notice")
    seen = read(notice)
    assert seen == {
        "kind": "spot-interruption",
        "action": "terminate",
        "time": iso(when),
        "seen_at": seen["seen_at"],
    }
    imds.recommend_rebalance(at(5))  # ... and a later rebalance never replaces it
    time.sleep(3 * POLL_S)
    assert read(notice) == seen
    assert read(hooks) == seen  # the file the job reads too

    status = agent_json(python, {}, "status", "--run-dir", str(run_dir))
    assert status["notice"] == seen and status["imds_error"] is None and status["running"] is True
    state = read(run_dir / "state.json")
    assert state["notice"] == seen and state["imds_endpoint"] == imds.endpoint
    log = (run_dir / "train.log").read_text()
    assert "checkpoint after " in log  # the job found the file through $CLOUDTRAIN_NOTICE_FILE
    assert f"[cloudtrain] spot interruption notice: terminate at {iso(when)}" in log
    assert "spot interruption notice" in (run_dir / "supervisor.log").read_text()

    (tmp_path / "work" / "finish").touch()
    wait_for((run_dir / "exit_code").exists, 20, "the run to finish")
    assert (run_dir / "exit_code").read_text() == "0\n"
    assert read(run_dir / "state.json")["notice"] == seen


def test_an_unreachable_imds_is_recorded_not_taken_for_no_notice(
    python: tuple[str, str, Path, dict[str, str]], start_job: Callable[..., Path]
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    run_dir = start_job({"CLOUDTRAIN_IMDS_ENDPOINT": endpoint, "CLOUDTRAIN_IMDS_POLL_S": str(POLL_S)})
    wait_for(lambda: read(run_dir / "state.json").get("imds_error"), 10, "imds_error in state.json")
    status = agent_json(python, {}, "status", "--run-dir", str(run_dir))
    assert "refused" in status["imds_error"].lower() and status["notice"] is None
    assert "IMDS: token request" in (run_dir / "supervisor.log").read_text()


def test_no_watcher_in_tests_without_an_endpoint(start_job: Callable[..., Path]) -> None:
    """CLOUDTRAIN_TESTING=1 and no endpoint: the supervisor never dials 169.254.169.254."""
    run_dir = start_job({"CLOUDTRAIN_IMDS_POLL_S": str(POLL_S)})
    wait_for(lambda: "no IMDS watcher" in (run_dir / "supervisor.log").read_text(), 10, "the log line")
    time.sleep(2 * POLL_S)
    state = read(run_dir / "state.json")
    assert state["imds_endpoint"] is None and state["imds_error"] is None
