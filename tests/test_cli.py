"""The command line: output, --json contracts and exit codes, as a user sees them."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from test_run_e2e import CLOUDTRAIN

from cloudtrain.catalog import load_catalog
from cloudtrain.cli import main
from cloudtrain.errors import ExitCode
from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.prices import estimated_spot
from cloudtrain.records import Lifecycle, RunHandle, RunState, SshAddress
from cloudtrain.settings import Settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "jobs" / "digits-mlp" / "job.yaml"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to make an AWS client."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("an AWS client was made")

    monkeypatch.setattr("cloudtrain.cloud.aws.make_client", refuse)


def test_version() -> None:
    result = cli("--version")
    assert result.exit_code == 0 and "cloudtrain, version 0.1.0" in result.output


def test_module_entry_point_help(tmp_path: Path) -> None:
    done = subprocess.run(  # `python -m cloudtrain` works too, from a folder without a source tree
        [sys.executable, "-m", "cloudtrain", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0
    for command in ("plan", "cost-report", "schema"):
        assert command in done.stdout
    assert "Exit codes" in done.stdout


def test_plan_dry_run_table() -> None:
    result = cli("plan", str(EXAMPLE), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "simulated AWS (dry-run)" in result.output
    assert (
        "Choice: g4dn.xlarge (1 x T4) in us-east-1a, spot at $0.1841/h (estimate: on-demand × 0.35)"
        in result.output
    )
    assert "Prices: the simulator's, which quote the catalog of 2025-05-01" in result.output
    assert "Estimate for budget.max_hours 1 h" in result.output


def test_plan_table_has_gpu_count_and_marks_offers_over_max_price(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nrun: r\nresources: {max_price: 0.3}\n")
    result = cli("plan", str(job), "--dry-run")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.split()[:1] == ["type"])
    assert header.split()[:4] == ["type", "GPU", "count", "AZ"]
    rows = {line.lstrip(" →").split()[0]: line for line in result.output.splitlines() if "%" in line}
    assert rows["g5.xlarge"].rstrip().endswith("estimate, > max")  # $0.3521/h
    assert rows["g4dn.xlarge"].rstrip().endswith("estimate")  # $0.1841/h, the choice
    assert rows["g4dn.xlarge"].lstrip(" →").split()[1:4] == ["T4", "16G", "1"]


@pytest.mark.parametrize("width", [80, 120])
def test_plan_table_never_cuts_a_price_or_a_type(width: int) -> None:
    """The table `run` shows before asking to spend, at a terminal's width."""
    import io

    from rich.console import Console

    from cloudtrain.api import plan_job
    from cloudtrain.cli import render_plan

    plan = plan_job(EXAMPLE, Settings.from_env(), dry_run=True)
    text = io.StringIO()
    render_plan(plan, Console(file=text, width=width))
    assert "…" not in text.getvalue()
    assert "→ g4dn.xlarge" in text.getvalue() and "$0.1841" in text.getvalue()


def test_plan_dry_run_json() -> None:
    result = cli("plan", str(EXAMPLE), "--dry-run", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["schema"] == 1 and data["simulated"] is True
    itype = load_catalog().get("g4dn.xlarge")
    assert itype is not None
    assert data["choice"]["price_per_hour"] == estimated_spot(itype.on_demand["us-east-1"])
    assert data["choice"]["price_source"] == "estimate" and data["price_basis"] == "simulated"
    assert data["estimate"]["total_usd"] > 0


TWO_NODES = "name: x\nrun: r\nkeras: 2\nresources: {gpu: T4, nodes: 2}\nbudget: {max_hours: 3}\n"


def test_plan_of_several_nodes_shows_n_times_the_price_and_estimate(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(TWO_NODES.replace("nodes: 2", "nodes: 1"))
    (tmp_path / "two.yaml").write_text(TWO_NODES)
    one = json.loads(cli("plan", str(tmp_path / "one.yaml"), "--dry-run", "--json").output)
    two = json.loads(cli("plan", str(tmp_path / "two.yaml"), "--dry-run", "--json").output)
    assert (one["nodes"], two["nodes"]) == (1, 2)
    assert two["choice"] == one["choice"] and two["choice"]["price_per_hour"] == 0.1841  # one instance
    for key in ("compute_usd", "ebs_usd", "total_usd"):
        assert two["estimate"][key] == pytest.approx(2 * one["estimate"][key], abs=1e-4)
    assert two["quota"] is None  # the simulated AWS has no Service Quotas
    result = cli("plan", str(tmp_path / "two.yaml"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Nodes: 2 × g4dn.xlarge in one zone, 2 × $0.1841/h = $0.3682/h" in result.output
    total = two["estimate"]["total_usd"]
    assert "Estimate for budget.max_hours 3 h, 2 nodes: compute $1.1046 + EBS 2 × 100 GiB" in result.output
    assert f"= ${total:.4f}" in result.output


@pytest.fixture
def quota_asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every EC2 quota asked for, (region, code); each answers 4 vCPUs (moto has no Service Quotas
    for EC2, so the quota is injected where the cloud layer reads it)."""
    from cloudtrain.cloud.aws import AwsCloud, ServiceQuota

    asked: list[tuple[str, str]] = []

    def quota(cloud: AwsCloud, code: str) -> ServiceQuota:
        asked.append((cloud.region, code))
        return ServiceQuota(code, "All G and VT Spot Instance Requests", 4.0, True)

    monkeypatch.setattr(AwsCloud, "ec2_quota", quota)
    return asked


def test_plan_checks_the_vcpu_quota_for_every_node(
    tmp_path: Path, quota_asked: list[tuple[str, str]]
) -> None:
    from moto import mock_aws

    job = tmp_path / "job.yaml"
    job.write_text(TWO_NODES.replace("{gpu: T4,", "{instance_type: g4dn.xlarge, region: us-east-1,"))
    with mock_aws():
        result = cli("plan", str(job))
        data = json.loads(cli("plan", str(job), "--json").output)
    assert result.exit_code == 0, result.output
    assert quota_asked == [("us-east-1", "L-3819A6DF")] * 2
    assert "Quota: 2 nodes × 4 vCPUs = 8 vCPUs of g4dn.xlarge > quota 4" in result.output
    assert "--desired-value 8" in result.output
    assert data["quota"]["status"] == "fail" and data["quota"]["data"]["vcpus"] == 8


def test_invalid_job_exits_2_before_any_aws_call(tmp_path: Path, no_aws: None) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nrun: r\nresources:\n  gpu: T5\n")
    result = cli("plan", str(job))
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert f"error: {job}:4: resources.gpu: unknown GPU 'T5' (did you mean 'T4'?)" in result.output
    assert "hint:" in result.output
    assert "Traceback" not in result.output


def test_an_error_naming_brackets_prints_them(tmp_path: Path, no_aws: None) -> None:
    """Square brackets in a path or a value are text, not console markup that eats them."""
    job = tmp_path / "a[b]" / "job.yaml"
    job.parent.mkdir()
    job.write_text("name: x\nbackend: tensorflw\nrun: '[/tmp] python t.py'\n")
    result = cli("plan", str(job))
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert f"error: {job}:2: backend:" in result.output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: x\n")
    result = cli("--debug", "plan", str(job))
    assert result.exit_code == 2 and "Traceback" in result.output


def test_impossible_plan_exits_2_naming_the_cheapest(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nrun: r\nresources: {gpu: T4, max_price: 0.05}\n")
    result = cli("plan", str(job), "--dry-run")
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert "no offer under max_price $0.0500/h: the cheapest is g4dn.xlarge" in result.output


def test_without_credentials_plan_prices_from_the_catalog_and_run_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's first question, before an AWS account exists: what would a GPU cost?"""
    bare = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),  # no ~/.aws, no cloudtrain home
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing can leave this machine
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    done = subprocess.run([CLOUDTRAIN, "plan", str(EXAMPLE)], env=bare, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "→ g4dn.xlarge" in done.stdout and "estimate: on-demand × 0.35" in done.stdout
    assert "Prices: no AWS credentials, so the catalog of 2025-05-01" in done.stdout
    assert "aws configure" in done.stdout
    done = subprocess.run(
        [CLOUDTRAIN, "plan", str(EXAMPLE), "--json"], env=bare, capture_output=True, text=True
    )
    data = json.loads(done.stdout)
    assert data["price_basis"] == "catalog" and data["choice"]["price_label"] == "estimate: on-demand × 0.35"
    # a run needs them: it stops before anything, saying so
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    on_demand = tmp_path / "on-demand.yaml"  # its plan needs no spot prices, so no AWS call
    on_demand.write_text(
        f"name: od\nworkdir: {EXAMPLE.parent}\nrun: python train.py\nresources: {{spot: false}}\n"
    )
    for job in (EXAMPLE, on_demand):
        result = cli("run", str(job), "--yes")
        assert result.exit_code == ExitCode.CLOUD_OR_REMOTE, result.output
        assert "error: no AWS credentials found" in result.output
        assert "--dry-run" in result.output and "launching" not in result.output
    assert json.loads(cli("status", "--json").output)["runs"] == []  # no run was begun


def test_profile_gives_the_region_and_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quota_asked: list[tuple[str, str]]
) -> None:
    """--profile NAME: its region is the plan's when the job names none; a missing one exits 2."""
    from moto import mock_aws

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile eu]\nregion = eu-west-1\naws_access_key_id = AKIAEUEUEUEUEUEUEUEU\n"
        "aws_secret_access_key = fake-eu-secret\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nrun: r\nresources: {gpu: T4}\n")
    with mock_aws():
        result = cli("--profile", "eu", "plan", str(job), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["region"] == "eu-west-1"
    assert {offer["zone"][:-1] for offer in plan["offers"]} == {"eu-west-1"}
    assert quota_asked == [("eu-west-1", "L-3819A6DF")] and plan["quota"]["status"] == "ok"

    missing = cli("--profile", "nope", "plan", str(job))
    assert missing.exit_code == ExitCode.INVALID_INPUT
    assert "error: AWS profile problem" in missing.output and "nope" in missing.output


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("cloudtrain.api.plan_job", interrupted)
    assert cli("plan", str(EXAMPLE)).exit_code == ExitCode.SIGINT


def test_sigterm_exits_143() -> None:
    script = (
        "import os, signal, sys\n"
        "sys.argv = ['cloudtrain', 'schema']\n"
        "import cloudtrain.api\n"
        "cloudtrain.api.job_schema = lambda: os.kill(os.getpid(), signal.SIGTERM)\n"
        "from cloudtrain.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == ExitCode.SIGTERM, done.stderr


def test_schema_is_json_schema() -> None:
    result = cli("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "cloudtrain job" and "resources" in schema["properties"]


# --- cost-report ------------------------------------------------------------------------


def seed(settings: Settings) -> None:
    day = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)
    with Ledger.open(settings) as ledger:
        for index, simulated in enumerate([False, False, True]):
            created = day + timedelta(days=index)
            run_id = f"job{index}-{created:%Y%m%d-%H%M%S}-000{index}"
            ledger.create_run(
                RunRow(
                    id=run_id,
                    name=f"job{index}",
                    state=RunState.SUCCEEDED,
                    created_at=created,
                    simulated=simulated,
                    backend="tensorflow",
                )
            )
            ledger.record_instance(
                InstanceRow(
                    id=f"i-{index:017x}",
                    run_id=run_id,
                    instance_type="g4dn.xlarge",
                    zone="us-east-1a",
                    lifecycle=Lifecycle.SPOT,
                    price_per_hour=0.2,
                    on_demand_per_hour=0.5,
                    launched_at=created,
                    running_at=created,
                    terminated_at=created + timedelta(hours=2),
                    disk_gb=100,
                    ebs_per_gb_month=0.08,
                )
            )
            if index < 2:  # ended, with what their first epoch projected
                ended = created + timedelta(hours=2)
                ledger.update_run(run_id, ended_at=ended, projected_usd=(0.40, 0.45)[index])


def test_cost_report_table_separates_real_and_simulated(settings: Settings) -> None:
    seed(settings)
    result = cli("cost-report")
    assert result.exit_code == 0, result.output
    assert "job0-" in result.output and "job2-" in result.output and "(sim)" in result.output
    assert "Real spend: 2 runs, 4.00 h" in result.output
    assert "Simulated (dry-run): 1 runs, 2.00 h" in result.output
    # each billed $0.40 + EBS $0.0219; projected $0.40 and $0.45: off by 5.2% and 6.7%
    assert (
        "Estimates: 2 ended runs projected $0.8500 after their first epoch, billed $0.8438 (mean error 6%)"
        in result.output
    )
    assert "saved 60%" in result.output


def shown(*args: str, width: int) -> list[str]:
    """What the installed CLI prints at COLUMNS=width (a user's terminal of that width)."""
    done = subprocess.run(
        [CLOUDTRAIN, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS=str(width)),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def header(lines: list[str]) -> list[str]:
    """A table's column names (``instance types`` as one word)."""
    rule = next(n for n, line in enumerate(lines) if line.startswith("───"))
    return lines[rule - 1].replace("instance types", "instance-types").replace("spot $/h", "spot-$/h").split()


RUN_COLUMNS = ["run", "instance-types", "state", "hours", "cost", "on-demand", "saving", "EBS", "total"]


@pytest.mark.parametrize("width", [80, 100, 120])
@pytest.mark.parametrize(
    ("command", "columns", "dropped"),
    [
        (
            ["status"],
            ["run", "state", "backend", "instance", "started", "duration", "cost"],
            {80: {"backend", "instance"}},
        ),
        (
            ["cost-report"],
            RUN_COLUMNS,
            {80: {"instance-types", "EBS", "on-demand"}, 100: {"instance-types", "EBS"}},
        ),
        (["cost-report", "--group-by", "day"], [c for c in RUN_COLUMNS if c != "state"], {}),
    ],
)
def test_tables_fit_the_terminal_with_whole_run_ids(
    settings: Settings, width: int, command: list[str], columns: list[str], dropped: dict[int, set[str]]
) -> None:
    seed(settings)
    lines = shown(*command, width=width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    expected = [c for c in columns if c not in dropped.get(width, set())]
    if "day" in command:
        expected[0] = "day"
    assert header(lines) == expected
    if "day" not in command:
        for index in range(3):  # seed's runs: each id whole, on one line
            assert any(line.startswith(f"job{index}-2026112{index}-100000-000{index}") for line in lines)


def test_a_run_id_wider_than_the_terminal_folds_and_is_never_cut(settings: Settings) -> None:
    created = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)
    run_id = f"{'long-name-' * 4}{created:%Y%m%d-%H%M%S}-abcd"  # a 40-character name
    with Ledger.open(settings) as ledger:
        ledger.create_run(
            RunRow(
                id=run_id, name="long-name-" * 4, state=RunState.FAILED, created_at=created, simulated=True
            )
        )
    for command in (["status"], ["cost-report"]):
        lines = shown(*command, width=40)
        assert "…" not in "".join(lines) and all(len(line) <= 40 for line in lines), "\n".join(lines)
        first = next(n for n, line in enumerate(lines) if line.startswith("long-name-"))
        width = lines[first].index("  ")  # the run column, folded over several lines
        column = "".join(line[:width].strip() for line in lines[first : first + 6])
        assert column.startswith(f"{run_id}(sim)"), column


def test_the_plan_fits_the_terminal(settings: Settings) -> None:
    full = ["type", "GPU", "count", "AZ", "spot-$/h", "on-demand", "saving", "price"]
    for width, columns in [(80, [c for c in full if c != "on-demand"]), (120, full)]:
        lines = shown("plan", str(EXAMPLE), "--dry-run", width=width)
        assert all(len(line) <= width for line in lines), "\n".join(lines)
        assert header(lines) == columns and any(line.startswith("→ g4dn.xlarge") for line in lines)


def test_cost_report_limit_keeps_totals(settings: Settings) -> None:
    seed(settings)
    result = cli("cost-report", "--limit", "1")
    assert "Showing the 1 most recent of 3" in result.output
    assert "Real spend: 2 runs" in result.output


def test_cost_report_json_and_csv(settings: Settings) -> None:
    seed(settings)
    data = json.loads(cli("cost-report", "--json").output)
    assert data["schema"] == 1 and len(data["rows"]) == 3
    assert data["totals"]["real"]["cost_usd"] == pytest.approx(0.8)
    csv_lines = cli("cost-report", "--format", "csv", "--group-by", "day").output.strip().splitlines()
    assert len(csv_lines) == 4  # header + 3 days


def test_cost_report_since_filter(settings: Settings) -> None:
    seed(settings)
    data = json.loads(cli("cost-report", "--json", "--since", "2026-11-21").output)
    assert [row["name"] for row in data["rows"]] == ["job2", "job1"]


def test_cost_report_bad_date_exits_2(settings: Settings) -> None:
    result = cli("cost-report", "--since", "last tuesday")
    assert result.exit_code == 2
    assert "error: --since 'last tuesday' is not a date" in result.output


def test_cost_report_empty_ledger(settings: Settings) -> None:
    result = cli("cost-report")
    assert result.exit_code == 0
    assert "Real spend: 0 runs" in result.output


@pytest.mark.parametrize(
    ("state", "message", "line"),
    [
        (
            RunState.LAUNCHING,
            "launching g4dn.xlarge (spot, $0.1578/h)",
            ("launching", "g4dn.xlarge (spot, $0.1578/h)"),
        ),
        (RunState.RUNNING, "running: : ; python x", ("running", ": ; python x")),  # the command kept whole
        (RunState.PULLING, "pulling back outputs and logs", ("pulling", "back outputs and logs")),
        (RunState.PROVISIONING, "verifying the host key", ("provisioning", "verifying the host key")),
        (RunState.SUCCEEDED, "run succeeded", ("run succeeded", "")),
        (RunState.FAILED, "image build failed", ("image build failed", "")),
    ],
)
def test_a_stage_line_says_its_state_once(state: RunState, message: str, line: tuple[str, str]) -> None:
    from cloudtrain.cli import stage_line

    assert stage_line(state, message) == line


# --- the reading commands start fast ----------------------------------------------------

HEAVY = (
    *("boto3", "botocore", "paramiko", "fabric", "invoke", "moto", "asyncssh", "cloudtrain.orchestrator"),
    *("pydantic", "matplotlib"),  # the job's model; plotting
    "rich._emoji_codes",  # rich's emoji table: 0.02 s, for nothing cloudtrain prints
)
MODULES_AFTER = f"""
import json, sys
from cloudtrain.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["status"],
        ["status", "--json"],
        ["status", "job0"],
        ["cost-report"],
        ["cost-report", "--format", "csv"],
        ["cost-report", "--group-by", "day", "--json"],
        ["logs", "job0"],
    ],
    ids=" ".join,
)
def test_reading_commands_load_no_cloud_or_ssh_library(
    settings: Settings, tmp_path: Path, command: list[str]
) -> None:
    """What reads the ledger starts in a fraction of a second: boto3, paramiko and the
    orchestrator stay unloaded (benchmarks/cli_startup.py times it)."""
    seed(settings)
    with Ledger.open(settings) as ledger:
        run = ledger.list_runs(limit=10)[-1]  # job0
        run_dir = tmp_path / "runs" / run.id
        (run_dir / "logs").mkdir(parents=True)
        (run_dir / "logs" / "train.log").write_text("Epoch 1/1\ntest loss 0.1\n")
        ledger.update_run(run.id, run_dir=str(run_dir), handle={"training_started": True})
    done = subprocess.run(
        [sys.executable, "-c", MODULES_AFTER, *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, done.stdout + done.stderr
    assert done.stdout.strip()


LEDGER_V1 = REPO / "tests" / "data" / "ledger-v1"  # written by cloudtrain 00fb72b (see make.py there)


def test_a_ledger_of_the_previous_schema_migrates_and_status_json_is_unchanged(settings: Settings) -> None:
    """status --json, as the version that wrote the ledger printed it, after the migration
    of each run's detail into its handle (schema 1 -> 2, then 3); keys added since
    (progress: no epoch of these came home; projected_usd: none was projected) aside."""
    settings.home.mkdir(parents=True, exist_ok=True)
    shutil.copy(LEDGER_V1 / "ledger.sqlite", settings.ledger_path)
    expected = json.loads((LEDGER_V1 / "status.json").read_text())
    with closing(sqlite3.connect(LEDGER_V1 / "ledger.sqlite")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        details = {run_id: json.loads(text) for run_id, text in conn.execute("SELECT id, detail FROM runs")}

    def as_then(record: dict[str, Any]) -> dict[str, Any]:
        assert record.pop("progress") is None and record.pop("projected_usd") is None
        return record

    listed = cli("status", "--json")
    assert listed.exit_code == 0, listed.output
    status = json.loads(listed.output)
    assert {**status, "runs": [as_then(r) for r in status["runs"]]} == expected["status"]
    for run_id, record in expected["runs"].items():
        shown = cli("status", run_id, "--json")
        assert as_then(json.loads(shown.output)) == record
    with Ledger.open(settings) as ledger:
        assert ledger.connection.execute("PRAGMA user_version").fetchone()[0] == 3
        handles = {run.id: run.handle for run in ledger.list_runs()}
    # every key of every run's detail is a field of its handle now, with its value
    assert handles == {run_id: RunHandle.from_json(detail) for run_id, detail in details.items()}
    assert handles["broken-20261130-110000-e5f6"] == RunHandle(instance_id="i-0000000000000004")
    assert handles["mnist-cnn-20261130-090000-a1b2"].ssh == SshAddress(
        "203.0.113.7", 22, "ubuntu", ("SHA256:abc", "SHA256:def")
    )


def test_text_that_looks_like_an_emoji_code_is_printed_as_it_is(settings: Settings) -> None:
    seed(settings)
    shown = CliRunner().invoke(main, ["status", "job:fire:"])
    assert shown.exit_code == 2 and "job:fire:" in shown.output


@pytest.mark.parametrize(
    "command",
    [
        ("run", str(EXAMPLE), "--dry-run"),
        ("plan", str(EXAMPLE), "--dry-run"),
        ("doctor", "--launch", "--dry-run"),
    ],
)
def test_a_dry_run_without_the_sim_extra_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    """`pip install cloudtrain` alone is for AWS: moto and asyncssh come with the sim extra."""
    monkeypatch.setitem(sys.modules, "asyncssh", None)  # as if not installed: find_spec says None
    result = cli(*command)
    assert result.exit_code == ExitCode.INVALID_INPUT, result.output
    assert "lacks asyncssh" in result.output and "pip install 'cloudtrain[sim]'" in result.output
    assert not (Settings.from_env().home / "sim").exists()  # no simulator, no simulated image started
