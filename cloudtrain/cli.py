"""The ``cloudtrain`` command: parse flags, call the API, render with rich, map errors to exit codes.

The one place a ``CloudtrainError`` becomes a message, a hint and an exit status.
Heavy imports (boto3, moto) happen inside the commands, so ``--help`` stays quick.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import logging
import os
import re
import signal
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cloudtrain import __version__
from cloudtrain.errors import CloudtrainError, ExitCode, InputError
from cloudtrain.progress import LiveStatus, Reporter
from cloudtrain.records import RunState, parse_iso, utcnow
from cloudtrain.settings import Settings
from cloudtrain.tables import Column, Row, ago, duration
from cloudtrain.tables import render as render_table

if TYPE_CHECKING:
    from cloudtrain.api import RunOutcome
    from cloudtrain.doctor import Report as DoctorReport
    from cloudtrain.gc import Survey
    from cloudtrain.liveview import LiveLog, StepBar, TransferBar
    from cloudtrain.logbars import BarFilter
    from cloudtrain.planner import Plan
    from cloudtrain.report import CostReport, CostTotals


# emoji=False: a ":name:" in a log line, a path or a message stays as it is (and rich's
# table of emoji codes, 0.02 s to load, is never loaded).
out = Console(soft_wrap=True, emoji=False)
if not out.is_terminal and not os.environ.get("COLUMNS"):  # piped or captured: 120 unless told
    out = Console(soft_wrap=True, width=120, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)


class Context:
    """What the top-level options decide, handed to every command."""

    def __init__(self, profile: str | None, debug: bool) -> None:
        self.profile = profile
        self.debug = debug

    @functools.cached_property
    def settings(self) -> Settings:
        return Settings.from_env(profile=self.profile)


def _raise_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(ExitCode.SIGTERM)


def _interrupted() -> None:
    """Ctrl-C (also at a prompt): the run's teardown has already happened on the way here.
    A second Ctrl-C now must not turn exit 130 into a death by the signal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    err.print("[bold red]interrupted[/]")
    sys.exit(int(ExitCode.SIGINT))


def _crash_report(error: BaseException, home: Path | None) -> Path | None:
    """Write the traceback of an unforeseen error to a file; where it went (None: nowhere)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = f"crash-{stamp}-{os.getpid()}.log"
    import tempfile

    for folder in ([home / "logs"] if home else []) + [Path(tempfile.gettempdir())]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(f"cloudtrain {__version__}: {' '.join(sys.argv)}\n{text}")
            return path
        except OSError:
            continue
    return None


def _debugging(ctx: click.Context) -> bool:
    options = ctx.find_object(Context)  # set by main() once the options are parsed
    return bool(options and options.debug)


class CloudtrainGroup(click.Group):
    """The whole command line's one error boundary: a ``CloudtrainError`` becomes its message,
    its hint and its exit code; Ctrl-C exits 130; anything unforeseen exits 70 (a bug) with one
    line and the traceback in a file. Click's own usage errors keep click's exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit):
            raise
        except CloudtrainError as e:
            debug = _debugging(ctx)
            if debug:
                err.print_exception()
                if e.debug:
                    err.print(f"[bold]debug:[/] {escape(e.debug)}", highlight=False)
            err.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False)
            if e.hint:
                err.print(f"[bold]hint:[/] {escape(e.hint)}", highlight=False)
            sys.exit(int(e.exit_code))
        except (KeyboardInterrupt, click.exceptions.Abort):
            _interrupted()
        except BrokenPipeError:  # `cloudtrain logs RUN | head`: the reader has what it wanted
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            sys.exit(int(ExitCode.SIGPIPE))
        except Exception as e:
            if _debugging(ctx):
                err.print_exception()
            home = None
            with contextlib.suppress(Exception):
                home = Settings.from_env().home
            report = _crash_report(e, home)
            where = f"the traceback is in {report}" if report else "the traceback could not be written"
            err.print(
                f"[bold red]error:[/] cloudtrain failed unexpectedly ({escape(type(e).__name__)}: "
                f"{escape(str(e)[:200])}); {escape(where)}",
                highlight=False,
            )
            err.print("[bold]hint:[/] This is a bug in cloudtrain: please report it with that file.")
            sys.exit(int(ExitCode.BUG))


@click.group(
    cls=CloudtrainGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="cloudtrain")
@click.option("--profile", metavar="NAME", help="AWS named profile (default: boto3's credential chain).")
@click.option("--debug", is_flag=True, help="Show tracebacks, AWS calls and remote command lines.")
@click.pass_context
def main(ctx: click.Context, profile: str | None, debug: bool) -> None:
    """Train a Keras job on the cheapest AWS GPU spot instance that fits it.

    \b
    Exit codes: 0 success, 1 the training command failed, 2 invalid input or an
    impossible plan, 3 cloud or remote failure, 4 budget reached, 70 a bug in
    cloudtrain (the traceback goes to a file it names), 130 SIGINT, 141 stdout
    closed early (| head), 143 SIGTERM.
    Add --dry-run to a command to use the local simulated AWS (no account needed).
    """
    ctx.obj = Context(profile, debug)
    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not debug:
        logging.getLogger("botocore").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_sigterm)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stderr with no file descriptor
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is it stuck?


pass_context = click.make_pass_decorator(Context)


# --- plan ------------------------------------------------------------------------------


def _money(value: float) -> str:
    return f"${value:,.4f}" if value < 10 else f"${value:,.2f}"


def render_plan(plan: Plan, console: Console, top: int = 8) -> None:
    from cloudtrain.budget import deadline_rule

    job = plan.job
    where = "simulated AWS (dry-run)" if plan.simulated else plan.region
    # When narrow, on-demand, the GPU count and the GPU model go, in that order.
    price_header = "spot $/h" if plan.lifecycle.value == "spot" else "$/h"
    columns = [
        Column("type"),
        Column("GPU", drop=1),
        Column("count", right=True, drop=2),
        Column("AZ"),
        Column(price_header, right=True),
        Column("on-demand", right=True, drop=3),
        Column("saving", right=True),
        Column("price"),
    ]
    best_per_type: dict[str, Any] = {}
    for offer in plan.offers:
        best_per_type.setdefault(offer.instance.name, offer)
    max_price = job.resources.max_price
    rows = []
    for offer in list(best_per_type.values())[:top]:
        chosen = offer is plan.choice
        over = max_price is not None and offer.price_per_hour > max_price
        itype = offer.instance
        cells = [
            ("→ " if chosen else "  ") + itype.name,
            f"{itype.gpu} {itype.gpu_memory_gib:.0f}G",
            str(itype.gpu_count),
            offer.zone or "any",
            _money(offer.price_per_hour),
            _money(offer.on_demand_per_hour),
            f"{offer.saving_pct:.0f}%",
            # an estimate's rule is said once, under the table (Prices:)
            ("estimate" if offer.price_source == "estimate" else offer.label) + (", > max" if over else ""),
        ]
        rows.append(Row(cells, "bold green" if chosen else ("dim" if over else None)))
    console.print(
        f"Offers for {job.name} ({job.backend}) in {where}, best per type", highlight=False, soft_wrap=False
    )
    console.print(render_table(columns, rows, console.width), highlight=False)
    choice = plan.choice
    console.print(
        f"Choice: [bold]{choice.instance.name}[/] ({choice.instance.gpu_count} x {choice.instance.gpu}) "
        f"in {choice.zone or plan.region}, {choice.lifecycle.value} at {_money(choice.price_per_hour)}/h "
        f"({choice.label}), {choice.saving_pct:.0f}% below on-demand "
        f"{_money(choice.on_demand_per_hour)}/h",
        highlight=False,
        soft_wrap=False,
    )
    if plan.nodes > 1:
        console.print(
            f"Nodes: {plan.nodes} × {choice.instance.name} in one zone, {plan.nodes} × "
            f"{_money(choice.price_per_hour)}/h = [bold]{_money(plan.price_per_hour_all_nodes)}/h[/]",
            highlight=False,
            soft_wrap=False,
        )
    if choice.note:
        console.print(f"Note: {escape(choice.note)}.", highlight=False, soft_wrap=False)
    console.print(f"Prices: {escape(price_basis(plan))}", highlight=False, soft_wrap=False)
    if plan.estimate:
        est = plan.estimate
        several, disks = (f", {plan.nodes} nodes", f"{plan.nodes} × ") if plan.nodes > 1 else ("", "")
        console.print(
            f"Estimate for budget.max_hours {est.hours:g} h{several}: compute {_money(est.compute_usd)} + "
            f"EBS {disks}{job.resources.disk_gb} GiB {_money(est.ebs_usd)} = "
            f"[bold]{_money(est.total_usd)}[/]",
            highlight=False,
            soft_wrap=False,
        )
    else:
        console.print(
            "No estimate: set budget.max_hours in the job to see what a run would cost.", soft_wrap=False
        )
    console.print(f"Deadline: {deadline_rule(job.budget)}.", highlight=False, soft_wrap=False)
    if plan.boot_provision_min is not None:
        minutes = plan.boot_provision_min
        nodes = f" for {plan.nodes} nodes" if plan.nodes > 1 else ""
        console.print(
            f"Image: base (resources.image: base): the {job.backend} environment is installed at boot, "
            f"about {minutes:g} min (~{_money(plan.price_per_hour_all_nodes * minutes / 60)}{nodes}) "
            "before training starts, on every run; `cloudtrain image build` once saves it.",
            highlight=False,
            soft_wrap=False,
        )


def price_basis(plan: Plan) -> str:
    """Where the plan's prices come from, and how to get better ones."""
    from cloudtrain.catalog import load_catalog
    from cloudtrain.prices import ESTIMATED_SPOT_FRACTION

    catalog = load_catalog()
    listed = f"on-demand from the catalog of {plan.catalog_date}"
    window = catalog.spot_observed
    estimate = f"estimated as on-demand × {ESTIMATED_SPOT_FRACTION:g}"
    rule = (
        f"spot is the median observed {window[0]} to {window[1]} where it has one, else {estimate}"
        if window
        else f"it has no observed spot prices, so spot is {estimate}"
    )
    if plan.price_basis == "live":
        return f"spot observed now (DescribeSpotPriceHistory in {plan.region}); {listed}."
    if plan.price_basis == "simulated":
        return f"the simulator's, which quote the catalog of {plan.catalog_date}: {rule}."
    if plan.price_basis == "catalog":
        return (
            f"no AWS credentials, so the catalog of {plan.catalog_date}: {rule}. "
            "For live spot prices: `aws configure` (or AWS_PROFILE), then plan again."
        )
    return f"{listed}."


@main.command("plan")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--dry-run", is_flag=True, help="Use the simulated AWS and its prices (no account needed).")
@pass_context
def plan_command(ctx: Context, job: str, as_json: bool, dry_run: bool) -> None:
    """Show which GPU spot instance JOB would rent, and what it would cost.

    JOB is a job file (job.yaml); it is validated before any AWS call. Spot prices are
    AWS's, observed now; without AWS credentials they come from the price catalog shipped
    with cloudtrain, each labelled with where it comes from.
    """
    from cloudtrain.api import plan_job, plan_quota

    plan = plan_job(job, ctx.settings, dry_run=dry_run, offline=True)
    quota = plan_quota(plan, ctx.settings)
    if as_json:
        click.echo(json.dumps({**plan.to_json(), "quota": quota.to_json() if quota else None}, indent=2))
        return
    render_plan(plan, out)
    if quota is not None:
        fix = f" {quota.fix}" if quota.fix else ""
        out.print(f"Quota: {escape(quota.summary)}.{escape(fix)}", highlight=False, soft_wrap=False)


# --- schema ----------------------------------------------------------------------------


@main.command("schema")
def schema_command() -> None:
    """Print the job file's JSON Schema (for editor completion)."""
    from cloudtrain.api import job_schema

    click.echo(json.dumps(job_schema(), indent=2))


@main.command("iam-policy")
@click.option(
    "--with-s3",
    "buckets",
    metavar="BUCKET",
    multiple=True,
    help="Also allow checking that BUCKET exists (jobs with s3:// data or checkpoint.s3 in it); repeatable.",
)
@click.option(
    "--boundary",
    is_flag=True,
    help="Print instead the permissions boundary every run's role gets (create it once, see below).",
)
@click.option(
    "--instance",
    is_flag=True,
    help="Print instead an example of a run's own role policy (cloudtrain writes one per run).",
)
def iam_policy_command(buckets: tuple[str, ...], boundary: bool, instance: bool) -> None:
    """Print the IAM policy cloudtrain needs, to attach to your user or role.

    It grants what `run`, `gc`, `image` and `doctor` call (the list in
    cloudtrain/permissions.py): EC2 on any resource; IAM only on the cloudtrain-* roles and
    instance profiles of runs that read S3, created only with the permissions boundary
    cloudtrain-instance-boundary and passed only to EC2; the spot service-linked role an
    account's first spot launch needs. Set up once:

    \b
      cloudtrain iam-policy > cloudtrain-policy.json
      cloudtrain iam-policy --boundary > boundary.json
      aws iam create-policy --policy-name cloudtrain-instance-boundary --policy-document file://boundary.json
      aws iam put-user-policy --user-name YOU --policy-name cloudtrain --policy-document file://cloudtrain-policy.json
    """
    from cloudtrain import permissions

    if boundary and instance:
        raise click.UsageError("--boundary and --instance print different policies: choose one.")
    if boundary:
        policy = permissions.boundary_policy()
    elif instance:
        policy = permissions.instance_policy_example()
    else:
        policy = permissions.user_policy(buckets)
    click.echo(permissions.dumps(policy))


# --- cost-report -----------------------------------------------------------------------


def _parse_when(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"{option} '{value}' is not a date",
            hint=f"Use ISO 8601, e.g. {option} 2026-11-01 or 2026-11-01T12:00:00Z.",
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _totals_line(label: str, totals: CostTotals) -> str:
    saving = f"{totals.saving_pct:.0f}%" if totals.saving_pct is not None else "-"
    return (
        f"{label}: {totals.runs} runs, {totals.hours:,.2f} h, {_money(totals.total_usd)} "
        f"(compute {_money(totals.cost_usd)} + EBS {_money(totals.ebs_usd)}); "
        f"on-demand would be {_money(totals.on_demand_usd)}, saved {saving}"
    )


def render_cost_report(report: CostReport, console: Console) -> None:
    """The cost table (whole run ids; when narrow, EBS, the instance types, on-demand, the
    state, hours and the saving go, in that order), then the totals."""
    key_header = {"run": "run", "day": "day", "instance-type": "instance type"}[report.group_by]
    by_run = report.group_by == "run"
    columns = [Column(key_header, fold=True)]
    if report.group_by != "instance-type":
        columns.append(Column("instance types", drop=6))
    if by_run:
        columns.append(Column("state", drop=4))
    columns += [
        Column("hours", right=True, drop=3),
        Column("cost", right=True),
        Column("on-demand", right=True, drop=5),
        Column("saving", right=True, drop=2),
        Column("EBS", right=True, drop=7),
        Column("total", right=True),
    ]
    rows = []
    for row in report.rows:
        cells = [row.key + (" (sim)" if row.simulated and by_run else "")]
        if report.group_by != "instance-type":
            cells.append(", ".join(row.instance_types) or "-")
        if by_run:
            cells.append(row.state or "")
        cells += [
            f"{row.hours:,.2f}",
            _money(row.cost_usd),
            _money(row.on_demand_usd),
            f"{row.saving_pct:.0f}%" if row.saving_pct is not None else "-",
            _money(row.ebs_usd),
            _money(row.total_usd),
        ]
        rows.append(Row(cells, "dim" if row.simulated else None))
    console.print(f"Costs by {key_header}", highlight=False)
    console.print(render_table(columns, rows, console.width), highlight=False)
    if report.matched > len(report.rows):
        console.print(
            f"Showing the {len(report.rows)} most recent of {report.matched}; "
            "totals cover all (--limit to change).",
            soft_wrap=False,
        )
    console.print(_totals_line("Real spend", report.real), highlight=False, soft_wrap=False)
    console.print(_totals_line("Simulated (dry-run)", report.simulated), highlight=False, soft_wrap=False)
    estimates = report.estimates
    if estimates.runs:
        error = f"{estimates.mean_error_pct:.0f}%" if estimates.mean_error_pct is not None else "-"
        console.print(
            f"Estimates: {estimates.runs} ended runs projected {_money(estimates.projected_usd)} after "
            f"their first epoch, billed {_money(estimates.billed_usd)} (mean error {error})",
            highlight=False,
            soft_wrap=False,
        )


@main.command("cost-report")
@click.option("--since", metavar="DATE", help="Only runs created at or after DATE (ISO 8601, UTC).")
@click.option("--until", metavar="DATE", help="Only runs created before DATE (ISO 8601, UTC).")
@click.option(
    "--group-by",
    type=click.Choice(["run", "day", "instance-type"]),
    default="run",
    show_default=True,
    help="One row per run, per day, or per instance type.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format; csv and json list every row.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Rows in the table (most recent first); totals always cover every run.",
)
@pass_context
def cost_report_command(
    ctx: Context,
    since: str | None,
    until: str | None,
    group_by: str,
    fmt: str,
    as_json: bool,
    limit: int,
) -> None:
    """What every run cost, and what it saved against on-demand.

    A run relaunched after a spot interruption is one row summed over its instances.
    Billing is per second with a 60 s minimum; a launch that never ran costs nothing.
    Dry-run runs are marked simulated and totalled apart from real spend.
    """
    from cloudtrain.ledger import Ledger
    from cloudtrain.report import cost_report, export

    fmt = "json" if as_json else fmt
    window = {"since": _parse_when(since, "--since"), "until": _parse_when(until, "--until")}
    with Ledger.open(ctx.settings) as ledger:
        if fmt == "table":
            render_cost_report(cost_report(ledger, group_by=group_by, limit=limit, **window), out)
        else:
            click.echo(export(ledger, fmt, group_by=group_by, **window), nl=False)


# --- run and the commands around it ---------------------------------------------------


def stage_line(state: RunState, message: str) -> tuple[str, str]:
    """The bold head and the rest of a stage's line, the state said once: "launching g4dn..."
    reads "▸ launching g4dn...", "running: CMD" "▸ running CMD", "run succeeded" as it is."""
    name = state.value
    for joint in (": ", " "):
        if message.startswith(name + joint):
            return name, message[len(name + joint) :]
    if message == name or message.endswith(" " + name):
        return message, ""
    return name, message


class ConsoleReporter(Reporter):
    """Renders the orchestrator's progress on stderr; the training log goes to stdout as it
    arrives (Keras's bars as their final state, unless stdout is a terminal).

    ``live``: a terminal's live view (liveview.py) under the log, which then goes through
    stderr's console too (both are the terminal)."""

    def __init__(self, quiet: bool = False, live: bool = False) -> None:
        self.quiet = quiet
        self.bar: TransferBar | None = None
        self.step_bar: StepBar | None = None
        self.view: LiveLog | None = None
        self.bars: BarFilter | None = None
        if live and not quiet:
            from cloudtrain.liveview import LiveLog

            self.view = LiveLog(err)
        elif not sys.stdout.isatty():
            from cloudtrain.logbars import BarFilter

            self.bars = BarFilter()

    def stage(self, state: RunState, message: str) -> None:
        self._end_transfer()
        self._end_steps()
        if self.view is not None and state != RunState.RUNNING:
            self.view.stop()
        if not self.quiet:
            head, rest = stage_line(state, message)
            err.print(f"[bold cyan]▸ {escape(head)}[/] {escape(rest)}".rstrip(), highlight=False)

    def info(self, message: str) -> None:
        self._end_transfer()
        if not self.quiet:
            err.print(f"  {escape(message)}", style="dim", highlight=False)

    def warn(self, message: str) -> None:
        self._end_transfer()
        self._end_steps()
        err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    def log(self, data: bytes) -> None:
        if self.quiet:
            return
        if self.view is not None:
            self.view.log(data)
            return
        if self.step_bar is not None and sys.stdout.isatty():  # the same terminal: above the bar
            err.print(Text.from_ansi(data.decode("utf-8", "replace").rstrip("\n")), highlight=False)
            return
        sys.stdout.buffer.write(data if self.bars is None else self.bars.feed(data))
        sys.stdout.buffer.flush()

    def live(self, status: LiveStatus) -> None:
        if self.view is not None:
            self.view.show(status)

    def transfer(self, what: str, done: int, total: int | None) -> None:
        """A progress bar on a terminal, once a transfer has taken a second."""
        if self.quiet or not err.is_terminal:
            return
        self._end_steps()
        if self.bar is None or self.bar.what != what:
            self._end_transfer()
            from cloudtrain.liveview import TransferBar

            self.bar = TransferBar(err, what)
        self.bar.update(done, total)

    def _end_transfer(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def steps(self, what: str, done: int, total: int | None) -> None:
        """A bar of steps on a terminal, the info lines printed above it; full, it goes."""
        if self.quiet or not err.is_terminal:
            return
        self._end_transfer()  # one bar at a time (rich draws one live display)
        if self.step_bar is not None and self.step_bar.what != what:
            self._end_steps()
        if total is not None and done >= total:
            self._end_steps()
            return
        if self.step_bar is None:
            from cloudtrain.liveview import StepBar

            self.step_bar = StepBar(err, what)
        self.step_bar.update(done, total)

    def _end_steps(self) -> None:
        if self.step_bar is not None:
            self.step_bar.stop()
            self.step_bar = None

    def close(self) -> None:
        """The end of the output: the view goes, an unfinished line is written out."""
        self._end_transfer()
        self._end_steps()
        if self.view is not None:
            self.view.flush()
        elif self.bars is not None and not self.quiet:
            sys.stdout.buffer.write(self.bars.flush())
            sys.stdout.buffer.flush()


PLAIN_OPTION = click.option(
    "--plain",
    is_flag=True,
    help="Lines only, no live view: the training log on stdout, a line per stage and epoch on stderr "
    "(the default when either is not a terminal).",
)


def _live_view(plain: bool) -> bool:
    """A live view under the log: on a terminal (stdout and stderr), unless ``--plain``."""
    return not plain and sys.stdout.isatty() and sys.stderr.isatty() and err.is_terminal


def _print_done(outcome: RunOutcome, settings: Settings) -> None:
    """``done RUN: $0.0031 (projected $0.0030 after the first epoch); results in runs/RUN``."""
    from cloudtrain.api import run_status

    folder = Path(outcome.run_dir)
    with contextlib.suppress(ValueError, OSError):  # under the current folder: as the user would type it
        folder = folder.resolve().relative_to(Path.cwd().resolve())
    where = escape(str(folder))
    bill = ""
    with contextlib.suppress(CloudtrainError):
        record = run_status(settings, outcome.run_id)[0]
        if record.get("cost_usd") is not None:
            projected = record.get("projected_usd")
            against = f" (projected ${projected:.4f} after the first epoch)" if projected is not None else ""
            bill = f"${record['cost_usd']:.4f}{against}; "
    err.print(f"[bold green]done[/] {outcome.run_id}: {bill}results in {where}", highlight=False)


def _confirm_spend(plan: Plan) -> bool:
    render_plan(plan, err)
    return click.confirm("Launch it and start paying?", default=False, err=True)


def _print_record(record: dict[str, Any]) -> None:
    click.echo(json.dumps(record, indent=2))


@main.command("run")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option(
    "--dry-run",
    is_flag=True,
    help="The same lifecycle on this machine: simulated AWS, real SSH, CPU training.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Parent folder of the run folder (default ./runs).",
)
@click.option(
    "--keep", is_flag=True, help="Leave the instance running afterwards (until `down` or its deadline)."
)
@click.option("--detach", is_flag=True, help="Return once training runs; `attach` follows it later.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before spending money.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the run record as JSON at the end (no live log)."
)
@PLAIN_OPTION
@click.option(
    "--simulate-interruption",
    "interruptions",
    multiple=True,
    metavar="AT",
    help="With --dry-run: a spot interruption notice at AT (epoch:N, when epoch N starts, or Ns after "
    "training starts), then the instance's termination; AT:no-notice (epoch:N:no-notice, "
    "Ns:no-notice): no notice, the instance is simply gone at AT; nodeK:AT (node1:epoch:3): node K of "
    "a run on several nodes is the one taken; repeat for the relaunched instances.",
)
@pass_context
def run_command(
    ctx: Context,
    job: str,
    dry_run: bool,
    out_dir: Path | None,
    keep: bool,
    detach: bool,
    yes: bool,
    as_json: bool,
    plain: bool,
    interruptions: tuple[str, ...],
) -> None:
    """Train JOB on the cheapest GPU spot instance that fits it, then bring the results home.

    Launches the instance, verifies its host key and Keras backend, syncs the workdir,
    streams the training log, pulls outputs/ and logs/ into runs/<run-id>/, and
    terminates the instance whatever happens. Exit code 1 if training fails.
    """
    from cloudtrain.api import run_job, run_status
    from cloudtrain.cloud.siminterrupt import SimulatedInterruption

    simulate = [SimulatedInterruption.parse(at) for at in interruptions]
    if simulate and not dry_run:
        raise InputError(
            "--simulate-interruption needs --dry-run", hint="AWS interrupts real runs by itself."
        )
    if not dry_run and not yes and not sys.stdin.isatty():
        raise InputError(
            "refusing to spend money without a terminal to confirm it",
            hint="Pass --yes to launch without asking, or --dry-run to simulate.",
        )
    run_ids: list[str] = []
    reporter = ConsoleReporter(quiet=as_json, live=_live_view(plain))
    try:
        outcome = run_job(
            job,
            ctx.settings,
            dry_run=dry_run,
            out_dir=out_dir,
            keep=keep,
            detach=detach,
            reporter=reporter,
            on_run_id=run_ids.append,
            confirm=None if yes else _confirm_spend,
            simulate=simulate,
        )
    finally:
        reporter.close()
        if as_json and run_ids:
            _print_record(run_status(ctx.settings, run_ids[0])[0])
    if not as_json:
        _print_done(outcome, ctx.settings)


@main.command("attach")
@click.argument("run")
@PLAIN_OPTION
@pass_context
def attach_command(ctx: Context, run: str, plain: bool) -> None:
    """Follow a detached RUN: stream its log, pull back its results, terminate its instance."""
    from cloudtrain.api import attach_run

    reporter = ConsoleReporter(live=_live_view(plain))
    try:
        outcome = attach_run(run, ctx.settings, reporter=reporter)
    finally:
        reporter.close()
    _print_done(outcome, ctx.settings)


@main.command("pull")
@click.argument("run")
@pass_context
def pull_command(ctx: Context, run: str) -> None:
    """Pull a live RUN's outputs and log into its run folder now (the instance keeps running)."""
    from cloudtrain.api import pull_run

    folder = pull_run(run, ctx.settings, reporter=ConsoleReporter())
    err.print(f"pulled into {escape(str(folder))}", highlight=False)


@main.command("status")
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list without RUN).")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Runs listed without RUN."
)
@pass_context
def status_command(ctx: Context, run: str | None, as_json: bool, limit: int) -> None:
    """Show RUN (a run id or a unique prefix of one), or the most recent runs."""
    from cloudtrain.api import run_status

    records = run_status(ctx.settings, run, limit=limit)
    if as_json:
        _print_record(records[0] if run else {"schema": 1, "runs": records})
        return
    if run:
        render_run(records[0], out)
        return
    out.print(render_runs(records, out.width, utcnow()), highlight=False)


def render_runs(records: list[dict[str, Any]], width: int, now: datetime) -> Text:
    """The run list: whole run ids; when narrow, the instance types, the backend, the
    duration and the start go, in that order."""
    columns = [
        Column("run", fold=True),
        Column("state"),
        Column("backend", drop=3),
        Column("instance", drop=4),
        Column("started", drop=1),
        Column("duration", right=True, drop=2),
        Column("cost", right=True),
    ]
    rows = []
    for record in records:
        started = parse_iso(record["started_at"]) if record["started_at"] else None
        ended = parse_iso(record["ended_at"]) if record["ended_at"] else now
        cells = [
            record["id"] + (" (sim)" if record["simulated"] else ""),
            record["state"],
            record["backend"] or "",
            ", ".join(i["type"] for i in record["instances"]) or "-",
            ago(started or parse_iso(record["created_at"]), now),
            duration((ended - started).total_seconds()) if started else "-",
            _money(record["cost_usd"]) if record["cost_usd"] is not None else "-",
        ]
        rows.append(Row(cells))
    text = Text("Runs\n")
    text.append_text(render_table(columns, rows, width))
    return text


def render_run(record: dict[str, Any], console: Console) -> None:
    console.print(
        f"[bold]{record['id']}[/] {record['state']}" + (" (simulated)" if record["simulated"] else ""),
        highlight=False,
    )
    for key in (
        "backend",
        "region",
        "created_at",
        "started_at",
        "ended_at",
        "exit_code",
        "cost_usd",
        "projected_usd",
        "run_dir",
        "kept_until",
    ):
        if record.get(key) is not None:
            console.print(f"  {key}: {escape(str(record[key]))}", highlight=False)
    progress = record.get("progress")
    if progress:
        from cloudtrain.metrics import describe as describe_metrics

        fit = f"fit {progress['fit']}, " if progress["fit"] else ""
        eta = f"; ETA {duration(progress['eta_s'])}" if progress["eta_s"] is not None else ""
        if progress.get("projected_usd") is not None:
            eta += f", projected ${progress['projected_usd']:.4f} at this pace"
        console.print(
            f"  progress: {fit}epoch {progress['epoch']}/{progress['epochs']}: "
            f"{escape(describe_metrics(progress['metrics']))}{eta}",
            highlight=False,
        )
    report = record.get("backend_report")
    if report:
        console.print(
            f"  verified: Keras {report.get('keras_version')} on {report.get('framework')} "
            f"{report.get('framework_version')}, devices: {report.get('devices') or 'CPU'}",
            highlight=False,
        )
    for instance in record["instances"]:
        console.print(
            f"  instance {instance['id']} {instance['type']} {instance['zone']} {instance['lifecycle']} "
            f"${instance['price_per_hour']:.4f}/h launched {instance['launched_at']} "
            f"ended {instance['ended_at'] or '-'}",
            highlight=False,
        )


@main.command("logs")
@click.argument("run")
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep streaming while the run trains (waiting for it to start, if it has not yet).",
)
@pass_context
def logs_command(ctx: Context, run: str, follow: bool) -> None:
    """Print RUN's training log (setup and run output)."""
    from cloudtrain.api import follow_logs
    from cloudtrain.logbars import BarFilter

    bars = None if sys.stdout.isatty() else BarFilter()  # a Keras bar as its final state, unless shown

    def sink(data: bytes) -> None:
        sys.stdout.buffer.write(data if bars is None else bars.feed(data))
        sys.stdout.buffer.flush()

    follow_logs(run, ctx.settings, sink, follow=follow, on_wait=lambda note: err.print(note, highlight=False))
    if bars is not None:
        sys.stdout.buffer.write(bars.flush())


@main.command("plot")
@click.argument("run")
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the picture (default: the run folder's metrics.png).",
)
@pass_context
def plot_command(ctx: Context, run: str, output: Path | None) -> None:
    """Draw RUN's loss and metrics against the epoch (metrics.png), from the epochs come home
    so far; also writes metrics.csv. Needs the plot extra: pip install 'cloudtrain[plot]'."""
    from cloudtrain.api import plot_run

    path = plot_run(run, ctx.settings, output)
    click.echo(str(path))


@main.command("down")
@click.argument("runs", nargs=-1)
@click.option(
    "--all",
    "all_active",
    is_flag=True,
    help="Every live or kept run of this CLOUDTRAIN_HOME, and every "
    "finished one whose teardown left something behind.",
)
@pass_context
def down_command(ctx: Context, runs: tuple[str, ...], all_active: bool) -> None:
    """Terminate the instances of RUNS (confirmed) and delete their placement groups,
    security groups, key pairs and instance profiles. A finished run whose teardown could
    not remove everything is torn down again; other finished runs are left as they are."""
    from cloudtrain.api import down_runs

    if not runs and not all_active:
        raise InputError("name the runs to stop, or pass --all", hint="`cloudtrain status` lists them.")
    stopped = down_runs(list(runs), ctx.settings, all_active=all_active)
    err.print(f"stopped {len(stopped)} run(s): {', '.join(stopped) or '-'}", highlight=False)


@main.command("gc")
@click.option(
    "--all-regions", is_flag=True, help="Look in every region of the price catalog, not only the default one."
)
@click.option("--yes", "-y", is_flag=True, help="Remove what is listed without asking.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Collect in the simulated cloud that --dry-run runs use (this CLOUDTRAIN_HOME's), not in "
    "AWS. As for every command, --dry-run means the simulated AWS: it still removes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was found and removed as JSON.")
@pass_context
def gc_command(ctx: Context, all_regions: bool, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Remove what runs of this owner (CLOUDTRAIN_OWNER, else user@host) left in the cloud.

    Finds the instances, volumes, placement groups, security groups, key pairs, spot
    requests and instance profiles tagged with this owner in the default region (AWS_REGION, the
    profile's, else us-east-1; --all-regions: every catalog region), and removes those
    whose run the ledger knows has finished (unless --keep still keeps it), or whose
    cloudtrain:expires tag has passed (so it works without the ledger). Another owner's
    resources (a teammate's, another machine's), and live runs of this owner that have
    not expired (another terminal, a concurrent test), are left alone.

    Lists them first (region, kind, id, run, why) and asks; without a terminal to ask
    in, pass --yes (without it nothing is removed, exit 2). Instances are terminated
    and confirmed before their volumes, groups and profiles go. Exit 3 names what could
    not be removed.
    """
    from cloudtrain.api import remove_garbage, survey_garbage
    from cloudtrain.errors import CloudError
    from cloudtrain.gc import GcResult

    found = survey_garbage(ctx.settings, all_regions=all_regions, dry_run=dry_run)
    if not as_json:
        render_survey(found, out)
    result = None
    if found.garbage and not yes:
        if not sys.stdin.isatty():
            if as_json:
                _print_record(GcResult(found).to_json())
            raise InputError(
                f"refusing to remove {len(found.garbage)} resource(s) without a terminal to confirm it",
                hint="Pass --yes to remove what is listed without asking.",
            )
        if not click.confirm(f"Remove these {len(found.garbage)} resource(s)?", default=False, err=True):
            if as_json:
                _print_record(GcResult(found).to_json())
            err.print("nothing removed", highlight=False)
            return
    if found.garbage:
        result = remove_garbage(ctx.settings, found, reporter=ConsoleReporter(quiet=as_json))
    if as_json:
        _print_record((result or GcResult(found)).to_json())
    elif result is not None:
        err.print(f"removed {len(result.removed)} of {len(found.garbage)} resource(s)", highlight=False)
    if result is not None and result.failed:
        names = " | ".join(
            f"{r.leftover.kind} {r.leftover.id} ({r.leftover.run_id}): {r.error}" for r in result.failed
        )
        raise CloudError(
            f"could not remove {len(result.failed)} resource(s): {names}",
            hint="Run `cloudtrain gc` again, or remove them in the EC2 / IAM console.",
        )


def render_survey(found: Survey, console: Console) -> None:
    from cloudtrain.records import parse_iso

    def ago(match: re.Match[str]) -> str:  # a time in the table: how long ago (the JSON has it)
        seconds = (found.at - parse_iso(match.group(0))).total_seconds()
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if abs(seconds) >= size:
                amount = f"{abs(seconds) // size:.0f}{unit}"
                return f"{amount} ago" if seconds >= 0 else f"in {amount}"
        return "just now"

    where = ", ".join(found.regions) + (" of the simulated AWS (dry-run)" if found.simulated else "")
    if not found.garbage:
        console.print(f"nothing to remove for {escape(found.owner)} in {where}", highlight=False)
    else:
        table = Table(
            title=f"Left behind by {escape(found.owner)}'s runs in {where}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        for header in ("region", "kind", "id", "run", "why"):  # ids whole; the rest may wrap
            table.add_column(header, no_wrap=header in ("id", "run"))
        for item in found.garbage:
            why = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", ago, item.why)
            table.add_row(item.region, item.kind, item.id, item.run_id, escape(why))
        console.print(table)
    if found.kept:
        runs = len({k.run_id for k in found.kept})
        console.print(
            f"left alone: {len(found.kept)} resource(s) of {runs} live or kept run(s) (`--json` lists them)",
            highlight=False,
        )


# --- image ----------------------------------------------------------------------------


@main.group("image")
def image_group() -> None:
    """The cloudtrain image every run starts from: build it once per region, list, copy, remove.

    \b
    A run's default image (no resources.image) is the newest cloudtrain image in its
    region whose version is the installed recipe's; an older one is used with a warning.
    """


_REGION = click.option("--region", metavar="R", help="The region (default: the profile's, else us-east-1).")
_DRY_RUN = click.option("--dry-run", is_flag=True, help="Use the simulated AWS (no account needed).")


@image_group.command("build")
@_REGION
@click.option(
    "--base",
    metavar="AMI",
    help="AMI id or name to build on (default: the newest AWS "
    "Deep Learning Base GPU AMI for Ubuntu 22.04, found by name and owner).",
)
@click.option("--instance-type", metavar="T", help="The builder's type (default g4dn.xlarge, on-demand).")
@click.option(
    "--backends",
    metavar="LIST",
    default="tensorflow,theano",
    show_default=True,
    help="The job environments to bake in, comma-separated.",
)
@_DRY_RUN
@click.option("--yes", "-y", is_flag=True, help="Do not ask before spending money.")
@click.option("--json", "as_json", is_flag=True, help="Print the build as JSON at the end.")
@pass_context
def image_build_command(
    ctx: Context,
    region: str | None,
    base: str | None,
    instance_type: str | None,
    backends: str,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Build the cloudtrain image: launch an on-demand builder from a base image, run the ami/
    recipe on it (output streamed), verify each job environment's backend (on a GPU builder:
    the GPU is seen), create the image, wait until it is available, tag it with the recipe's
    version, and terminate the builder, also when a step fails or on Ctrl-C. The build is
    recorded in the ledger as a run named image-build (its own line in cost-report).
    """
    from cloudtrain.api import build_image

    envs = tuple(b.strip() for b in backends.split(",") if b.strip())
    if not dry_run and not yes:
        if not sys.stdin.isatty():
            raise InputError(
                "refusing to spend money without a terminal to confirm it",
                hint="Pass --yes to build without asking, or --dry-run to simulate.",
            )
        if not click.confirm(
            "Launch an on-demand GPU builder (about 20-40 minutes of it) and build the image?",
            default=False,
            err=True,
        ):
            raise InputError("not built: declined", hint="Nothing was started or spent.")
    reporter = ConsoleReporter(quiet=as_json)
    try:
        result = build_image(
            ctx.settings,
            region=region,
            base=base,
            instance_type=instance_type,
            envs=envs,
            dry_run=dry_run,
            reporter=reporter,
        )
    finally:
        reporter.close()
    if as_json:
        _print_record(result.to_json())
    else:
        err.print(
            f"[bold green]done[/] {result.image_id} ({result.name}), version {result.version}, in "
            f"{result.region}; the build's cost: `cloudtrain cost-report` ({result.run_id})",
            highlight=False,
        )


@image_group.command("list")
@_REGION
@_DRY_RUN
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
def image_list_command(ctx: Context, region: str | None, dry_run: bool, as_json: bool) -> None:
    """This account's cloudtrain images in a region, newest first; → marks the one runs use."""
    from cloudtrain.api import list_images
    from cloudtrain.cloud.aws import default_region
    from cloudtrain.cloud.simimage import recipe_version

    images = list_images(ctx.settings, region=region, dry_run=dry_run)
    version = recipe_version()
    available = [i for i in images if i.state == "available"]
    chosen = next((i for i in available if i.version == version), available[0] if available else None)
    where = region or (images[0].region if images else default_region(ctx.settings))
    if as_json:
        data = {
            "schema": 1,
            "region": where,
            "recipe_version": version,
            "default": chosen.id if chosen else None,
            "images": [{**i.to_json(), "current": i.version == version} for i in images],
        }
        _print_record(data)
        return
    if not images:
        out.print(f"no cloudtrain image in {where}; `cloudtrain image build` makes one", highlight=False)
        return
    table = Table(
        title=f"cloudtrain images in {where}{' (simulated AWS)' if dry_run else ''}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for header in ("id", "name", "version", "state", "created"):
        table.add_column(header, no_wrap=True)
    table.add_column("frameworks")
    for image in images:
        mark = "→ " if chosen is image else "  "
        note = "" if image.version == version else " (old)" if image.version else " (none)"
        created = image.created_at[:16].replace("T", " ")
        version_cell = (image.version or "-") + note
        frameworks = escape(image.frameworks) or "-"
        table.add_row(mark + image.id, escape(image.name), version_cell, image.state, created, frameworks)
    out.print(table)
    out.print(f"installed recipe version: {version}", highlight=False)


@image_group.command("rm")
@click.argument("image")
@_REGION
@_DRY_RUN
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
def image_rm_command(ctx: Context, image: str, region: str | None, dry_run: bool, as_json: bool) -> None:
    """Deregister IMAGE (an AMI id or name of this account) and delete its snapshots."""
    from cloudtrain.api import remove_image

    removed = remove_image(ctx.settings, image, region=region, dry_run=dry_run)
    if as_json:
        _print_record({"schema": 1, "removed": removed.to_json()})
    else:
        err.print(
            f"removed {removed.id} ({removed.name}) in {removed.region} and "
            f"{len(removed.snapshot_ids)} snapshot(s)",
            highlight=False,
        )


@image_group.command("copy")
@click.argument("image")
@click.option("--to", "to", required=True, metavar="R", help="The region to copy it into.")
@_REGION
@_DRY_RUN
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
def image_copy_command(
    ctx: Context, image: str, to: str, region: str | None, dry_run: bool, as_json: bool
) -> None:
    """Copy IMAGE (AMI id or name) into region R, with its name and version; waits until the
    copy is available (copying is cheaper than building again)."""
    from cloudtrain.api import copy_image

    copy = copy_image(ctx.settings, image, to, region=region, dry_run=dry_run)
    if as_json:
        _print_record({"schema": 1, "copy": copy.to_json()})
    else:
        err.print(escape(f"copied {image} to {copy.region} as {copy.id} ({copy.name})"), highlight=False)


@main.group("sim")
def sim_group() -> None:
    """The local simulated cloud behind --dry-run."""


@sim_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
def sim_status_command(ctx: Context, as_json: bool) -> None:
    """Whether this CLOUDTRAIN_HOME's simulator runs, and its simulated AWS endpoint."""
    from cloudtrain.cloud.simulator import simulator_status

    state = simulator_status(ctx.settings)
    data = {
        "schema": 1,
        "running": state is not None,
        "pid": state and state["pid"],
        "endpoint": state and state["endpoint"],
        "started_at": state and state["started_at"],
    }
    if as_json:
        _print_record(data)
    elif state:
        out.print(
            f"simulator {state['pid']} running since {state['started_at']}; AWS endpoint {state['endpoint']}",
            highlight=False,
        )
    else:
        out.print("simulator not running (it starts on demand with --dry-run)")


@sim_group.command("stop")
@pass_context
def sim_stop_command(ctx: Context) -> None:
    """Stop the simulator, its simulated instances and their processes."""
    from cloudtrain.cloud.simulator import stop_simulator

    out.print("simulator stopped" if stop_simulator(ctx.settings) else "simulator was not running")


# --- doctor ----------------------------------------------------------------------------

_DOCTOR_STATUS = {
    "ok": ("✓ ok", "green"),
    "warn": ("! warn", "yellow"),
    "fail": ("✗ fail", "bold red"),
    "skip": ("- skip", "dim"),
}


def render_doctor(report: DoctorReport, console: Console) -> None:

    where = "the simulated AWS (dry-run)" if report.simulated else "AWS"
    table = Table(
        title=f"cloudtrain doctor: {where}, region {report.region}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("finding")
    for finding in report.findings:
        label, style = _DOCTOR_STATUS[finding.status.value]
        table.add_row(Text(label, style=style), finding.title, Text(finding.summary))
        if finding.fix and finding.status.value in ("warn", "fail"):
            table.add_row("", "", Text.assemble(("fix: ", "bold"), finding.fix))
    console.print(table)
    counts = report.counts()
    console.print(
        f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failed, {counts['skip']} skipped",
        highlight=False,
    )


@main.command("doctor")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the simulated cloud (started as `plan --dry-run` does) and the simulated image.",
)
@click.option("--region", metavar="REGION", help="Check this region (default: the one a job would use).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option(
    "--launch",
    is_flag=True,
    help="Instead of the checks: launch a small spot instance (t3.micro) through a run's whole "
    "control path, no training, and remove it; prints each phase's seconds and the cost (cents).",
)
@click.option("--yes", "-y", is_flag=True, help="With --launch: do not ask before spending (cents).")
@pass_context
def doctor_command(
    ctx: Context, dry_run: bool, region: str | None, as_json: bool, launch: bool, yes: bool
) -> None:
    """Check what a run needs, and say how to fix what is missing.

    With --launch, a smoke test instead: Canonical's Ubuntu 22.04 found by name and
    owner, a key pair and a /32 security group, a spot t3.micro with IMDSv2 required,
    its host key pinned from the console, the agent on the image's python3 (configure,
    watchdog, a command followed to its end), teardown confirmed, and nothing of it
    left. It costs a few cents on AWS (`cost-report` shows it as doctor-launch); with
    --dry-run it runs against the simulator. Exit 0 when every phase passed, else the
    exit code of the failure (3 for a cloud or remote one).

    Each check is ok, warn or fail (skip: not checked because one it needs failed),
    with a one-line explanation and, for a problem, the fix. Exit code 0 when
    nothing failed (warnings included), 3 when a check failed (what a run would then
    stop on is a cloud failure too), 2 for bad options.

    \b
    Checks:
      credentials  where boto3 finds credentials (--profile, AWS_PROFILE, the
                   environment, ~/.aws) and whose they are: STS GetCallerIdentity
      region       the region a job without resources.region uses (--region,
                   AWS_DEFAULT_REGION, the profile, else us-east-1); the price
                   catalog must know it
      keys         $CLOUDTRAIN_HOME/keys is 0700 and each private key in it 0600
                   (a run refuses looser ones); the fix is the chmod to run
      quotas       the EC2 vCPU quotas of GPU spot and on-demand G and P
                   instances (Service Quotas L-3819A6DF, L-7212CCBC, L-DB2E81BA,
                   L-417A185B): too small for the smallest type fails for G spot
                   (the default job) and warns for the others; a warning if
                   Service Quotas cannot be asked
      image        the cloudtrain image (cloudtrain-gpu-*, yours) in the region
      leftovers    instances and key pairs still there for runs that ended
    With --dry-run, also:
      simulator    this CLOUDTRAIN_HOME's simulated cloud (started if needed);
                   the checks above then run against it
      sim-image    whether the simulated image is built, its job environments
                   and the Python each one uses
    """
    if launch:
        _doctor_launch(ctx, dry_run, region, as_json, yes)
        return
    from cloudtrain.doctor import diagnose
    from cloudtrain.errors import CloudError

    report = diagnose(ctx.settings, dry_run=dry_run, region=region)
    if as_json:
        _print_record(report.to_json())
    else:
        render_doctor(report, out)
    if report.failed:
        names = ", ".join(f.check for f in report.failed)
        raise CloudError(
            f"{len(report.failed)} check(s) failed: {names}",
            hint="Apply the fixes shown, then run `cloudtrain doctor` again.",
        )


def _doctor_launch(ctx: Context, dry_run: bool, region: str | None, as_json: bool, yes: bool) -> None:
    """``doctor --launch``: the smoke test, its phases and its cost."""
    from cloudtrain.api import launch_smoke_test, run_status
    from cloudtrain.smoketest import SMOKE_TYPE, smoke_price

    if not dry_run and not yes:
        from cloudtrain.cloud.aws import default_region

        price = smoke_price(SMOKE_TYPE, region or default_region(ctx.settings))
        if not sys.stdin.isatty():
            raise InputError(
                "doctor --launch spends money (a few cents) and there is no terminal to ask",
                hint="Pass --yes to launch without asking, or --dry-run to simulate.",
            )
        if not click.confirm(
            f"Launch a spot {SMOKE_TYPE} (on-demand ${price:.4f}/h, spot less) for a few minutes?",
            default=False,
            err=True,
        ):
            raise InputError("not launched", hint="Nothing was started.")
    reporter = ConsoleReporter(quiet=as_json)
    try:
        result = launch_smoke_test(ctx.settings, region=region, dry_run=dry_run, reporter=reporter)
    finally:
        reporter.close()
    cost = run_status(ctx.settings, result.run_id)[0].get("cost_usd")
    if as_json:
        _print_record({**result.to_json(), "cost_usd": cost})
        return
    width = max(len(p.name) for p in result.phases)
    for p in result.phases:
        line = f"{p.name:<{width}}  {p.seconds:6.1f} s  {escape(p.detail)}"
        out.print(line, highlight=False, soft_wrap=True)
    total = sum(p.seconds for p in result.phases)
    bill = f"${cost:.4f}" if cost is not None else "unknown"
    out.print(
        f"[bold green]ok[/] {result.run_id}: {len(result.phases)} phases in {total:.0f} s, cost {bill}"
        + (" (simulated)" if result.simulated else ""),
        highlight=False,
    )


if __name__ == "__main__":
    main()
