"""What the CLI and the tests call: plan, run, attach, pull, stop and inspect jobs.

Each function takes ``Settings`` and returns a typed record; none prints or exits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudtrain.errors import CloudtrainError, InputError, LedgerError
from cloudtrain.progress import Reporter
from cloudtrain.records import RunState, utcnow
from cloudtrain.settings import DEFAULT_REGION, Settings

if TYPE_CHECKING:  # the rest is imported where it is used: `status`, `logs` and `cost-report` load none of it
    from cloudtrain.catalog import Catalog
    from cloudtrain.cloud.aws import ImageInfo
    from cloudtrain.cloud.siminterrupt import SimulatedInterruption
    from cloudtrain.doctor import Finding
    from cloudtrain.gc import GcResult, Survey
    from cloudtrain.imagebuild import BuildResult
    from cloudtrain.ledger import Ledger, RunRow
    from cloudtrain.orchestrator import Orchestrator, RunContext
    from cloudtrain.planner import Plan
    from cloudtrain.smoketest import SmokeResult
    from cloudtrain.spec import JobSpec


@contextmanager
def cloud_settings(settings: Settings, dry_run: bool) -> Iterator[Settings]:
    """The settings to reach AWS with: as given, or pointed at this home's simulated cloud."""
    if not dry_run:
        yield settings
        return
    from cloudtrain.cloud.simulator import ensure_simulator

    yield ensure_simulator(settings)


def job_region(spec: JobSpec, settings: Settings) -> str:
    """The job's region, else the default one (``cloud.aws.default_region``)."""
    if spec.resources.region:
        return spec.resources.region
    from cloudtrain.cloud.aws import default_region

    return default_region(settings)


def _plan(spec: JobSpec, catalog: Catalog, active: Settings, now: datetime, offline: bool = False) -> Plan:
    """The plan at live prices; ``offline``: at the catalog's when there are no credentials."""
    from cloudtrain.cloud.aws import AwsCloud
    from cloudtrain.errors import NoCredentialsError
    from cloudtrain.planner import candidate_types, plan

    region = job_region(spec, active)
    types = [t.name for t in candidate_types(spec, catalog) if t.on_demand_price(region) is not None]
    prices = None
    try:
        prices = (
            AwsCloud(active, region).spot_prices(types, spec.resources.zones, now)
            if types and spec.resources.spot
            else []
        )
    except NoCredentialsError:
        if not offline:
            raise
    return plan(spec, catalog, prices, region=region, now=now, simulated=active.simulated)


def plan_job(
    job_path: str | os.PathLike[str],
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    offline: bool = False,
) -> Plan:
    """Validate the job (before any AWS call), fetch spot prices, choose an offer.
    ``offline``: without AWS credentials, price it from the catalog (``plan``; a run needs
    them anyway)."""
    from cloudtrain.catalog import load_catalog
    from cloudtrain.spec import load_job

    catalog = load_catalog()
    spec = load_job(job_path, catalog)
    with cloud_settings(settings, dry_run) as active:
        return _plan(spec, catalog, active, now or utcnow(), offline)


def plan_quota(plan: Plan, settings: Settings) -> Finding | None:
    """Whether the account's vCPU quota holds the plan's choice, all its nodes (``doctor``'s
    check); None where there is none to ask: a dry-run (the simulated AWS has no Service
    Quotas) or no credentials."""
    from cloudtrain.cloud.aws import AwsCloud, credentials_source
    from cloudtrain.doctor import MAX_ATTEMPTS, check_plan_quota

    if plan.simulated or credentials_source(settings) is None:
        return None
    return check_plan_quota(AwsCloud(settings, plan.region, max_attempts=MAX_ATTEMPTS), plan)


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    run_dir: Path
    exit_code: int


def secrets_from(spec: JobSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The values of the job's ``secrets`` from the local environment; all must be set."""
    missing = [name for name in spec.secrets if name not in environ]
    if missing:
        raise InputError(
            f"the job's secrets are not set in this environment: {', '.join(missing)}",
            hint=f"export {missing[0]}=... before running; secrets are read locally and never written.",
        )
    return {name: environ[name] for name in spec.secrets}


def run_job(
    job_path: str | os.PathLike[str],
    settings: Settings,
    *,
    dry_run: bool = False,
    out_dir: Path | None = None,
    keep: bool = False,
    detach: bool = False,
    reporter: Reporter | None = None,
    environ: Mapping[str, str] | None = None,
    on_run_id: Callable[[str], None] | None = None,
    confirm: Callable[[Plan], bool] | None = None,
    simulate: Sequence[SimulatedInterruption] = (),
) -> RunOutcome:
    """Plan, launch, train, pull back and tear down; raise on failure (TrainingFailed: exit 1)."""
    from cloudtrain.catalog import load_catalog
    from cloudtrain.ledger import Ledger
    from cloudtrain.orchestrator import Orchestrator
    from cloudtrain.planner import candidate_types
    from cloudtrain.spec import load_job

    catalog = load_catalog()
    spec = load_job(job_path, catalog)
    secrets = secrets_from(spec, os.environ if environ is None else environ)
    reporter = reporter or Reporter()
    out = (out_dir or Path.cwd() / "runs").resolve()
    candidate_types(spec, catalog)  # a GPU the backend cannot use is refused before anything starts
    _check_nodes(spec, job_path, keep=keep, detach=detach, simulate=simulate)
    if dry_run:
        from cloudtrain.cloud.simimage import ensure_image
        from cloudtrain.cloud.siminterrupt import InterruptionSchedule
        from cloudtrain.cloud.simulator import ensure_simulator, require_simulator

        require_simulator()  # before minutes of building the simulated image
        image = ensure_image((spec.backend,), reporter)
        active = ensure_simulator(settings, image=image)
    else:
        from botocore.exceptions import NoCredentialsError

        from cloudtrain.cloud.aws import credentials_source, translate

        if credentials_source(settings) is None:  # an on-demand plan asks AWS nothing: ask here
            raise translate(NoCredentialsError(), "run")
        active = settings
    chosen = _plan(spec, catalog, active, utcnow())
    if confirm is not None and not active.simulated and not confirm(chosen):
        raise InputError("not launched: the plan was declined", hint="Nothing was started or spent.")
    with Ledger.open(active) as ledger:
        orchestrator = Orchestrator(
            spec,
            active,
            ledger,
            region=chosen.region,
            out_dir=out,
            plan=chosen,
            job_path=Path(job_path).resolve(),
            secrets=secrets,
            reporter=reporter,
            keep=keep,
            detach=detach,
            watcher=InterruptionSchedule(active, simulate) if dry_run and simulate else None,
        )
        ctx = orchestrator.start()
        try:
            if on_run_id:
                on_run_id(ctx.run_id)
        except BaseException:  # e.g. Ctrl-C right here: the run must not stay "planned"
            orchestrator.finish(ctx, RunState.CANCELLED, None)
            raise
        code = orchestrator.run(ctx)
        return RunOutcome(ctx.run_id, ctx.run_dir, code)


def _check_nodes(
    spec: JobSpec,
    job_path: str | os.PathLike[str],
    *,
    keep: bool,
    detach: bool,
    simulate: Sequence[SimulatedInterruption],
) -> None:
    """What a run on several nodes cannot do (yet), refused before anything starts."""
    nodes = spec.resources.nodes
    if nodes > 1 and (keep or detach):
        raise InputError(
            f"{job_path}: resources.nodes: {nodes}: --keep and --detach are for runs on one node",
            hint="Run it without them (cloudtrain follows the nodes and tears them all down), "
            "or with resources.nodes: 1.",
        )
    for at in simulate:
        if at.node >= nodes:
            raise InputError(
                f"--simulate-interruption {at}: the job has {nodes} node{'s' if nodes > 1 else ''} "
                f"(resources.nodes in {job_path})",
                hint=f"Name a node from node0 to node{nodes - 1}.",
            )


def settings_for_run(run: RunRow, settings: Settings) -> Settings:
    """The settings that reach a run's cloud: the owner its resources are tagged with (as the
    ledger recorded it at launch: a host renamed since must not lose them), and the simulator
    for a dry-run run."""
    owner = run.handle.owner
    if owner:
        settings = settings.with_(owner=owner)
    if not run.simulated:
        return settings
    from cloudtrain.cloud.simulator import ensure_simulator

    return ensure_simulator(settings)


def _resumed(
    run: RunRow,
    settings: Settings,
    ledger: Ledger,
    reporter: Reporter | None,
    *,
    need_secrets: bool = False,
) -> tuple[Orchestrator, RunContext]:
    """An orchestrator and context for a run that is already on an instance.

    The job's secrets come from this environment, as for `run`: they mask the log that
    comes home (and go to a relaunched instance). ``need_secrets``: all must be set."""
    import yaml

    from cloudtrain.catalog import load_catalog
    from cloudtrain.cloud.aws import AwsCloud
    from cloudtrain.orchestrator import Orchestrator, RunContext
    from cloudtrain.remote.session import Endpoint, Session
    from cloudtrain.spec import JobSpec

    handle = run.handle
    if not run.run_dir or handle.ssh is None or handle.key_path is None:
        raise InputError(f"run {run.id} never reached its instance", hint="Nothing to attach to or pull.")
    run_dir = run_folder(run)
    try:
        job_text = (run_dir / "job.yaml").read_text()
    except FileNotFoundError:
        raise InputError(
            f"run {run.id}'s job file {run_dir / 'job.yaml'} is missing",
            hint=f"cloudtrain needs the job the run was started with; put it back, or stop the run's "
            f"instance with `cloudtrain down {run.id}`.",
        ) from None
    spec = JobSpec.model_validate(yaml.safe_load(job_text))
    if need_secrets:
        secrets = secrets_from(spec, os.environ)
    else:
        secrets = {name: os.environ[name] for name in spec.secrets if name in os.environ}
    active = settings_for_run(run, settings)
    ssh = handle.ssh
    endpoint = Endpoint(ssh.host, ssh.port, ssh.user, Path(handle.key_path), frozenset(ssh.fingerprints))
    log_file = run_dir / "logs" / "train.log"
    here = log_file.stat().st_size if log_file.exists() else 0  # with the earlier instances' bytes
    ctx = RunContext(
        run_id=run.id,
        run_dir=run_dir,
        cloud=AwsCloud(active, run.region or DEFAULT_REGION),
        handle=handle.changed(training_started=True),  # it trains there, or has trained
        session=Session(endpoint),
        log_offset=max(0, here - handle.log_base),
    )
    orchestrator = Orchestrator(
        spec,
        active,
        ledger,
        region=run.region or DEFAULT_REGION,
        out_dir=run_dir.parent,
        reporter=reporter,
        secrets=secrets,
        replan=lambda: _plan(spec, load_catalog(), active, utcnow()),  # for a relaunch
    )
    return orchestrator, ctx


def plot_run(ref: str, settings: Settings, out: Path | None = None) -> Path:
    """Draw RUN's metrics.png (or ``out``) and write its metrics.csv from the epochs come
    home so far; the picture's path."""
    from cloudtrain import metrics
    from cloudtrain.ledger import Ledger
    from cloudtrain.plot import write_png

    with Ledger.open(settings) as ledger:
        run = ledger.resolve_run(ref)
        folder = run_folder(run)
    if not metrics.series(folder):
        raise InputError(
            f"run {run.id} has no metrics yet ({folder / metrics.METRICS_FILE} is empty or missing)",
            hint="An epoch's metrics come home when Keras's fit finishes it; see the log with "
            f"`cloudtrain logs {run.id}`.",
        )
    metrics.write_csv(folder)
    path = write_png(folder, out)
    assert path is not None  # the series has rows
    return path


def run_folder(run: RunRow) -> Path:
    """The run's folder (its job.yaml, log and results), which must still be there."""
    folder = Path(run.run_dir) if run.run_dir else None
    if folder is not None and folder.is_dir():
        return folder
    if run.state.finished:
        hint = (
            "cloudtrain brought the run's log and outputs home only there: restore the folder, "
            f"or see what the ledger keeps with `cloudtrain status {run.id}`."
        )
    else:
        hint = (
            "It holds the job the run was started with and its log: put it back, or stop the "
            f"run's instance with `cloudtrain down {run.id}`."
        )
    where = f" {folder}" if folder is not None else ""
    raise InputError(f"run {run.id}'s folder{where} is missing (deleted or moved)", hint=hint)


def attach_run(ref: str, settings: Settings, *, reporter: Reporter | None = None) -> RunOutcome:
    """Follow a detached run to its end: stream the log, pull back, tear down."""
    from cloudtrain.ledger import Ledger

    with Ledger.open(settings) as ledger:
        run = ledger.resolve_run(ref)
        if run.state.finished:
            raise InputError(
                f"run {run.id} has already {run.state.value}", hint=f"Its results are in {run.run_dir}."
            )
        orchestrator, ctx = _resumed(run, settings, ledger, reporter, need_secrets=True)
        nodes = orchestrator.spec.resources.nodes
        if nodes > 1:  # it would follow the chief alone: the workers' failures and losses unseen
            raise InputError(
                f"run {run.id} trains on {nodes} nodes: attach follows runs on one node only",
                hint=f"`cloudtrain logs {run.id} -f` streams the chief's log; `cloudtrain down {run.id}` "
                "stops every node.",
            )
        code = orchestrator.resume(ctx)
        return RunOutcome(run.id, ctx.run_dir, code)


def pull_run(ref: str, settings: Settings, *, reporter: Reporter | None = None) -> Path:
    """Pull a live run's outputs and log into its run folder (the instance keeps running)."""
    from cloudtrain.ledger import Ledger

    with Ledger.open(settings) as ledger:
        run = ledger.resolve_run(ref)
        if run.state.finished:
            raise InputError(
                f"run {run.id} has {run.state.value}: its instance is gone",
                hint=f"What was pulled back is in {run.run_dir}.",
            )
        orchestrator, ctx = _resumed(run, settings, ledger, reporter, need_secrets=True)
        session = ctx.session
        assert session is not None
        try:
            orchestrator.pull(ctx)
        finally:
            session.close()
        return Path(ctx.run_dir)


def down_runs(refs: list[str], settings: Settings, *, all_active: bool = False) -> list[str]:
    """Terminate the instances of live or kept runs (confirmed), and mark them cancelled;
    for a finished run whose teardown left something behind, retry that teardown.

    Every run is attempted; what could not be removed is raised at the end, naming it."""
    from cloudtrain.cloud.aws import AwsCloud
    from cloudtrain.errors import CloudError
    from cloudtrain.ledger import Ledger
    from cloudtrain.runrecord import write_run_json
    from cloudtrain.teardown import teardown

    stopped, problems = [], []
    with Ledger.open(settings) as ledger:
        left_behind = ledger.runs_left_behind()
        if all_active:
            runs = [
                r
                for r in ledger.list_runs()
                if not r.state.finished or r.handle.kept_until or r.id in left_behind
            ]
        else:
            runs = [ledger.resolve_run(r) for r in refs]
        for run in runs:
            if run.state.finished and not run.handle.kept_until and run.id not in left_behind:
                continue
            handle = run.handle
            ended = {i.id for i in ledger.instances(run.id) if i.terminated_at}
            if handle.instance_id in ended:
                handle = handle.changed(instance_id=None)
            try:
                cloud = AwsCloud(settings_for_run(run, settings), run.region or DEFAULT_REGION)
                left = teardown(cloud, ledger, run.id, handle)
            except LedgerError:
                raise  # the cloud part is done or said; what failed is the record of it
            except CloudtrainError as e:
                left = [e.message]
            if left:
                problems.append(f"{run.id}: {'; '.join(left)}")
                continue
            state = run.state if run.state.finished else RunState.CANCELLED
            ledger.update_run(
                run.id, state=state, ended_at=run.ended_at or utcnow(), handle={"kept_until": None}
            )
            ledger.add_event(run.id, "down", "stopped by `cloudtrain down`")
            if run.run_dir and Path(run.run_dir).is_dir():
                write_run_json(ledger, run.id, Path(run.run_dir))
            stopped.append(run.id)
    if problems:
        raise CloudError(
            f"stopped {len(stopped)} run(s), but not everything: " + " | ".join(problems),
            hint="Run `cloudtrain down` again, or remove what is named in the EC2 console.",
        )
    return stopped


def survey_garbage(
    settings: Settings, *, all_regions: bool = False, dry_run: bool = False, now: datetime | None = None
) -> Survey:
    """What ``gc`` would remove: this owner's resources of finished or expired runs, in
    the default region (or every catalog region) of AWS, or of the simulated cloud."""
    from cloudtrain.catalog import load_catalog
    from cloudtrain.cloud.aws import default_region
    from cloudtrain.gc import survey
    from cloudtrain.ledger import Ledger

    with cloud_settings(settings, dry_run) as active, Ledger.open(active) as ledger:
        regions = load_catalog().regions if all_regions else (default_region(active),)
        return survey(active, ledger, tuple(regions), now=now)


def remove_garbage(settings: Settings, found: Survey, *, reporter: Reporter | None = None) -> GcResult:
    """Remove what ``survey_garbage`` found (in its cloud: AWS or the simulated one).

    Every item is attempted; what could not be removed is in the result's ``failed``."""
    from cloudtrain.gc import remove
    from cloudtrain.ledger import Ledger

    with cloud_settings(settings, found.simulated) as active, Ledger.open(active) as ledger:
        return remove(active, ledger, found, reporter=reporter)


def run_status(settings: Settings, ref: str | None = None, *, limit: int = 20) -> list[dict[str, Any]]:
    """One run's record, or the most recent runs' (as ``status --json`` prints them)."""
    from cloudtrain.ledger import Ledger
    from cloudtrain.runrecord import run_record

    with Ledger.open(settings) as ledger:
        runs = [ledger.resolve_run(ref)] if ref else ledger.list_runs(limit=limit)
        return [run_record(ledger, run.id) for run in runs]


LOGS_POLL_S = 1.0
LOGS_RECONNECTS = 3  # drops of `logs -f`'s stream from a live instance before it gives up
LOGS_RELAUNCH_WAIT_S = 1800.0  # `logs -f` after a loss: how long a run may show no change


def follow_logs(
    ref: str,
    settings: Settings,
    sink: Callable[[bytes], Any],
    *,
    follow: bool = False,
    on_wait: Callable[[str], Any] | None = None,
) -> None:
    """A run's log: the local copy, then (with ``follow``, for a live run) the rest as it comes.

    Following a run that has not started training yet waits for it (``on_wait`` hears
    each state it passes through) and returns if it ends before training. An instance
    taken away mid-follow is waited out: the log goes on with the relaunched instance's."""
    from cloudtrain.ledger import Ledger

    note = on_wait or (lambda _: None)
    with Ledger.open(settings) as ledger:
        run = _until_training(ledger, ledger.resolve_run(ref), follow, note)
        if not run.run_dir:  # an image build: its output went to the terminal that ran it
            note(f"{run.id} keeps no log here: it has no run folder")
            return
        local = run_folder(run) / "logs" / "train.log"
        live = follow and not run.state.finished  # -f streams the instance's own copy
        if not local.exists() and run.handle.training_started and not live:
            raise InputError(
                f"run {run.id}'s log {local} is missing (deleted or moved)",
                hint="The log came home only there."
                if run.state.finished
                else f"`cloudtrain logs {run.id} -f` streams the instance's copy while the run lives.",
            )
        printed = local.read_bytes() if local.exists() else b""
        sink(printed)
        if not follow or run.state.finished:
            return
        orchestrator, ctx = _resumed(run, settings, ledger, None)
        unset = [name for name in orchestrator.spec.secrets if name not in orchestrator.secrets]
        if unset:
            note(f"{', '.join(unset)} not set here: a value the training prints shows unmasked")
        offset = max(0, len(printed) - ctx.log_base)  # this instance's bytes already printed
        while True:
            ended, offset = _tail_instance(orchestrator, ctx, offset, sink)
            if ended:
                return
            run = ledger.resolve_run(run.id)
            if not run.state.finished:
                note(
                    f"{ctx.instance_id} was taken away; waiting for {run.id} to go on on a new "
                    f"instance (`cloudtrain attach {run.id}` relaunches a detached run)"
                )
                run = _until_relaunched(ledger, run.id, ctx.instance_id)
            if run.state.finished:  # what its controller brought home that was not shown
                if local.exists():
                    sink(local.read_bytes()[_unshown(run, ctx, offset) :])
                return
            orchestrator, ctx = _resumed(run, settings, ledger, None)
            offset = 0


def _unshown(run: Any, ctx: Any, offset: int) -> int:
    """Where the local log goes on past what was shown of the lost instance ``ctx`` (``offset``
    bytes): the local log holds the earlier instances' bytes (``ctx.log_base``), what the
    controller got of the lost one, then the later instances' (from the run's ``log_base``)."""
    shown: int = ctx.log_base + offset
    if run.handle.relaunches == ctx.relaunches:  # it was not relaunched
        return shown
    return min(shown, int(run.handle.log_base))


def _until_training(ledger: Any, run: Any, follow: bool, note: Callable[[str], Any]) -> Any:
    """The run once it trains or has ended (at once without ``follow``)."""
    state = None
    while follow and not run.state.finished and not run.handle.training_started:
        if run.state != state:
            state = run.state
            note(f"waiting for {run.id} to start training (now {state.value})")
        time.sleep(LOGS_POLL_S)
        run = ledger.get_run(run.id)
    return run


def _until_relaunched(ledger: Any, run_id: str, lost: str | None) -> Any:
    """The run once it has ended, or trains on an instance other than ``lost``; a CloudError
    when its ledger row has not changed for LOGS_RELAUNCH_WAIT_S (nobody is relaunching it)."""
    from cloudtrain.errors import CloudError

    seen, since = None, time.monotonic()
    while True:
        run = ledger.get_run(run_id)
        moved = run.handle.instance_id != lost and run.handle.training_started
        if run.state.finished or moved:
            return run
        if (run.state, run.handle) != seen:
            seen, since = (run.state, run.handle), time.monotonic()
        elif time.monotonic() - since > LOGS_RELAUNCH_WAIT_S:
            raise CloudError(
                f"{run_id} has not gone on since {lost} was taken away "
                f"({LOGS_RELAUNCH_WAIT_S / 60:g} min with no change)",
                hint=f"`cloudtrain attach {run_id}` relaunches it; `cloudtrain down {run_id}` ends it.",
            )
        time.sleep(LOGS_POLL_S)


def _tail_instance(
    orchestrator: Any, ctx: Any, offset: int, sink: Callable[[bytes], Any]
) -> tuple[bool, int]:
    """Stream the instance's log from ``offset`` to its end: (True, offset reached) once the
    training has ended, (False, ...) if AWS took the instance away. A drop on a live
    instance reconnects."""
    from cloudtrain.recovery import InstanceLost
    from cloudtrain.remote.agent import LogFollower, RemoteAgent

    ctx.session.give_up = lambda: orchestrator.instance_lost(ctx)  # no 5-minute connect to a gone host
    follower = LogFollower(
        RemoteAgent(ctx.session, orchestrator.spec.backend),
        offset,
        sink,
        secrets=orchestrator.secrets.values(),
        lost=lambda: orchestrator.instance_lost(ctx),
        reconnects=LOGS_RECONNECTS,
    )
    try:
        follower.follow(between=lambda: orchestrator.renew_deadline(ctx))  # a follower renews
        return True, follower.offset
    except InstanceLost:
        return False, follower.offset
    finally:
        ctx.session.close()


# --- cloudtrain image: build, list, copy, remove -------------------------------------------


def build_image(
    settings: Settings,
    *,
    region: str | None = None,
    base: str | None = None,
    instance_type: str | None = None,
    envs: Sequence[str] | None = None,
    dry_run: bool = False,
    reporter: Reporter | None = None,
) -> BuildResult:
    """Build the cloudtrain image in a region (``imagebuild.build``). With ``dry_run`` the
    simulated image is built (or reused) in the cache first, as ``run --dry-run`` does, and the
    builder, a simulated host, runs the recipe over it."""
    from cloudtrain.cloud.aws import default_region
    from cloudtrain.cloud.simimage import ENVS
    from cloudtrain.imagebuild import DEFAULT_BUILDER_TYPE, build, builder_price
    from cloudtrain.ledger import Ledger

    reporter = reporter or Reporter()
    wanted = tuple(envs or ENVS)
    unknown = [e for e in wanted if e not in ENVS]
    if unknown:  # before anything is started
        raise InputError(f"no job environment {', '.join(unknown)}", hint=f"Use {', '.join(ENVS)}.")
    instance_type = instance_type or DEFAULT_BUILDER_TYPE
    if dry_run:  # the type is checked before the simulated image and the simulator start
        builder_price(instance_type, region or settings.region or DEFAULT_REGION)
        from cloudtrain.cloud.simimage import ensure_image
        from cloudtrain.cloud.simulator import ensure_simulator, require_simulator

        require_simulator()
        image = ensure_image(wanted, reporter)
        active = ensure_simulator(settings, image=image)
    else:
        active = settings
    with Ledger.open(active) as ledger:
        return build(
            active,
            ledger,
            region=region or default_region(active),
            base=base,
            instance_type=instance_type,
            envs=wanted,
            reporter=reporter,
        )


def launch_smoke_test(
    settings: Settings,
    *,
    region: str | None = None,
    instance_type: str | None = None,
    dry_run: bool = False,
    reporter: Reporter | None = None,
) -> SmokeResult:
    """``doctor --launch``: one small spot instance through a run's control path, no
    training (``smoketest.smoke_test``); against the simulator with ``dry_run``."""
    from cloudtrain.cloud.aws import default_region
    from cloudtrain.ledger import Ledger
    from cloudtrain.smoketest import SMOKE_TYPE, smoke_price, smoke_test

    instance_type = instance_type or SMOKE_TYPE
    if not dry_run:  # before anything starts (the simulator's region is its own default)
        region = region or default_region(settings)
        smoke_price(instance_type, region)
    with cloud_settings(settings, dry_run) as active, Ledger.open(active) as ledger:
        return smoke_test(
            active,
            ledger,
            region=region or default_region(active),
            instance_type=instance_type,
            reporter=reporter,
        )


def list_images(settings: Settings, *, region: str | None = None, dry_run: bool = False) -> list[ImageInfo]:
    """This account's cloudtrain images in a region, newest first."""
    from cloudtrain.cloud.aws import AwsCloud, default_region

    with cloud_settings(settings, dry_run) as active:
        return AwsCloud(active, region or default_region(active)).cloudtrain_images()


def remove_image(
    settings: Settings, image: str, *, region: str | None = None, dry_run: bool = False
) -> ImageInfo:
    """Deregister one of this account's images (id or name) and delete its snapshots."""
    from cloudtrain.cloud.aws import AwsCloud, default_region

    with cloud_settings(settings, dry_run) as active:
        cloud = AwsCloud(active, region or default_region(active))
        found = cloud.image_info(image)
        cloud.delete_image(found)
        return found


def copy_image(
    settings: Settings,
    image: str,
    to: str,
    *,
    region: str | None = None,
    dry_run: bool = False,
    wait: bool = True,
) -> ImageInfo:
    """Copy one of this account's images into region ``to`` (same name, version and tags);
    with ``wait``, until the copy is available. Returns the copy."""
    from cloudtrain.catalog import load_catalog
    from cloudtrain.cloud.aws import TAG_EXPIRES, AwsCloud, default_region

    with cloud_settings(settings, dry_run) as active:
        source_region = region or default_region(active)
        if to == source_region:
            raise InputError(f"{image} is in {to} already", hint="Name another region with --to.")
        if to not in load_catalog().regions:
            raise InputError(
                f"unknown region {to}", hint=f"Use one of the catalog's: {', '.join(load_catalog().regions)}."
            )
        source = AwsCloud(active, source_region).image_info(image)
        target = AwsCloud(active, to)
        tags = {k: v for k, v in source.tags.items() if k != TAG_EXPIRES and not k.startswith("aws:")}
        copy_id = target.copy_image(source, tags)
        if wait:
            target.wait_image_available(copy_id)
        return target.image_info(copy_id)


def job_schema() -> dict[str, Any]:
    """The job file's JSON Schema (``cloudtrain schema``)."""
    from cloudtrain.spec import json_schema

    return json_schema()
