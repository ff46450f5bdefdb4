"""The run lifecycle: launch, provision, sync, train, pull back, tear down.

Each stage takes what the previous one produced and moves the run to its next state
in the ledger; the orchestrator sequences them (the phases on an instance go through
``recovery.run_phases``, which relaunches after a loss) and owns cleanup: whatever
happens (a failure, SIGINT, SIGTERM), the ``finally`` pulls back what it can and
terminates the instance (confirmed), then deletes the security group and key pair.
The same code runs for AWS and for ``--dry-run``: only the settings differ (the
endpoint, and what the simulator says its instances are: no GPU, on loopback).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import yaml

from cloudtrain import budget, metrics
from cloudtrain.agent.redact import LogRedactor
from cloudtrain.bringup import (
    describe_backend,
    run_recipe,
    ssh_endpoint,
    verify_backend,
)
from cloudtrain.budget import DEFAULT_DEADLINE_HOURS
from cloudtrain.cloud.aws import (
    AwsCloud,
    Image,
    KeyPair,
    LaunchedInstance,
    LaunchRequest,
    caller_cidr,
    run_tags,
    s3_buckets,
)
from cloudtrain.cluster import node_environment
from cloudtrain.errors import (
    BudgetError,
    CapacityError,
    CloudError,
    CloudtrainError,
    ExitCode,
    InputError,
    RemoteError,
    TrainingFailed,
)
from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.planner import BASE_IMAGE, Offer, Plan, launch_offers
from cloudtrain.progress import LiveStatus, Reporter
from cloudtrain.records import Lifecycle, RunHandle, RunState, iso, new_run_id, utcnow
from cloudtrain.recovery import (
    LOST_STATES,
    CheckpointKeeper,
    InstanceLost,
    Phase,
    PhaseSteps,
    last_checkpoint,
    pull_checkpoint,
    run_phases,
)
from cloudtrain.remote.agent import (
    REMOTE_CHECKPOINT,
    REMOTE_RUN_DIR,
    REMOTE_WORKDIR,
    AgentCli,
    AgentConfig,
    Beat,
    LogFollower,
    RemoteAgent,
)
from cloudtrain.remote.session import HostKeyMismatch, Session
from cloudtrain.remote.sync import SyncReport
from cloudtrain.runrecord import write_run_json
from cloudtrain.settings import Settings
from cloudtrain.spec import JobSpec
from cloudtrain.teardown import shielded_from_signals, teardown

log = logging.getLogger(__name__)

RENEW_S = 600.0  # a following controller moves such a deadline on this often
MAX_LAUNCH_OFFERS = 5  # offers tried when AWS has no capacity, before giving up
STREAM_RECONNECTS = 5
BUDGET_SHOW_S = 300.0  # the cost so far is shown this often while the log streams
MAX_RELAUNCHES = 3  # spot interruptions survived per run, before giving up
WORKERS_END_S = 120.0  # after the chief's command succeeded, how long the workers' may take to end


class TrainingWatcher(Protocol):
    """Told of the training as it goes (``run --dry-run``'s scheduled interruptions)."""

    def training_started(self, nodes: Sequence[str], instance_number: int) -> None:
        """Training started on the run's ``instance_number``-th instance (0: the first), or
        group of instances: ``nodes``, their ids in rank order."""

    def log_line(self, nodes: Sequence[str], instance_number: int, line: str) -> None:
        """The training there printed ``line`` (the chief's, on several nodes)."""


@dataclass
class Node:
    """A worker of a run on several nodes (rank 1 and up; the chief, rank 0, is the
    RunContext's own instance): cloudtrain starts the same command there, keeps its log in
    ``logs/node-K.log`` and fails the run when it fails."""

    rank: int
    instance_id: str
    launched: LaunchedInstance
    session: Session | None = None
    log_offset: int = 0  # bytes of its log brought home
    exit_code: int | None = None
    redactor: LogRedactor | None = None  # its log's secrets masked across the pieces

    @property
    def log_name(self) -> str:
        return f"node-{self.rank}.log"


@dataclass
class RunContext:
    """What a run has acquired so far; the ``finally`` cleans up exactly this."""

    run_id: str
    run_dir: Path
    cloud: AwsCloud
    # The run's state in the cloud (instance, group, key, profile, relaunches, offsets):
    # changed only through Orchestrator._record, here first, then in the ledger.
    handle: RunHandle = field(default_factory=RunHandle)
    session: Session | None = None
    launched: LaunchedInstance | None = None
    log_offset: int = 0  # bytes of this instance's log streamed so far
    metrics_offset: int = 0  # bytes of this instance's metrics file brought home
    beat: Beat | None = None  # the last heartbeat of the log's tail: idle time and progress
    idle_said: bool = False  # the idle guard spoke, and no progress came since
    plot_said: bool = False  # that metrics.png cannot be drawn here
    renewed: float | None = None  # time.monotonic() of the last renewal of the deadline
    # for relaunches: what the first launch prepared, and what went before
    image: Image | None = None
    key: KeyPair | None = None
    tags: dict[str, str] = field(default_factory=dict)
    lost: list[tuple[str, str | None]] = field(default_factory=list)  # (type, zone) taken away
    workers: list[Node] = field(default_factory=list)  # on several nodes: all but the chief
    failed_node: Node | None = None  # the worker whose failure ended the run

    @property
    def node_ids(self) -> list[str]:
        """The run's instances now, in rank order (the chief first)."""
        return [i for i in (self.instance_id, *(w.instance_id for w in self.workers)) if i]

    @property
    def instance_id(self) -> str | None:
        return self.handle.instance_id

    @property
    def security_group_id(self) -> str | None:
        return self.handle.security_group_id

    @property
    def key_name(self) -> str | None:
        return self.handle.key_name

    @property
    def key_path(self) -> Path | None:
        return Path(self.handle.key_path) if self.handle.key_path else None

    @property
    def instance_profile(self) -> str | None:  # the run's own, for S3
        return self.handle.instance_profile

    @property
    def relaunches(self) -> int:
        return self.handle.relaunches

    @property
    def log_base(self) -> int:  # bytes of the local log from earlier instances
        return self.handle.log_base

    @property
    def training_started(self) -> bool:
        return self.handle.training_started


class Orchestrator:
    """Runs one job end to end, recording every step in the ledger."""

    def __init__(
        self,
        spec: JobSpec,
        settings: Settings,
        ledger: Ledger,
        *,
        region: str,
        out_dir: Path,
        plan: Plan | None = None,
        job_path: Path | None = None,
        secrets: Mapping[str, str] | None = None,
        reporter: Reporter | None = None,
        keep: bool = False,
        detach: bool = False,
        watcher: TrainingWatcher | None = None,
        replan: Callable[[], Plan] | None = None,
        remote_agent: Callable[[Session, str], RemoteAgent] = RemoteAgent,
    ) -> None:
        self.plan = plan  # None when resuming a run (attach, pull) ...
        self.replan = replan  # ... until a relaunch needs one: the offers as they are now
        self.spec = spec
        self.region = region
        self.settings = settings
        self.ledger = ledger
        self.job_path = job_path
        self.out_dir = out_dir
        self.secrets = dict(secrets or {})
        ledger.redact(self.secrets.values())  # a value in an error or remote output shows as ***
        self.reporter = reporter or Reporter()
        self.keep = keep
        self.detach = detach
        self.watcher = watcher
        self._keeper_events: list[tuple[str, str, datetime]] = []  # from the keeper's thread
        self._remote_agent = remote_agent  # the boundary to the instance (tests hand a fake)
        self.agent_cli = AgentCli.for_backend(spec.backend)  # for sync's and pull's streams

    # --- bookkeeping -------------------------------------------------------------------

    def _state(self, ctx: RunContext, state: RunState, message: str, **changes: Any) -> None:
        self.ledger.update_run(ctx.run_id, state=state, **changes)
        self.ledger.add_event(ctx.run_id, state.value, message)
        self.reporter.stage(state, message)

    def _record(self, ctx: RunContext, **changes: Any) -> None:
        """Change fields of the run's handle, here and in the ledger."""
        ctx.handle = ctx.handle.changed(**changes)
        self.ledger.update_run(ctx.run_id, handle=changes)

    # --- the lifecycle -----------------------------------------------------------------

    def start(self) -> RunContext:
        """Record the run and make its folder; nothing is launched yet."""
        assert self.plan is not None
        now = utcnow()
        run_id = new_run_id(self.spec.name, now)
        run_dir = self.out_dir / run_id
        run_dir.mkdir(parents=True, exist_ok=False)
        self.ledger.create_run(
            RunRow(
                id=run_id,
                name=self.spec.name,
                state=RunState.PLANNED,
                created_at=now,
                job_path=str(self.job_path),
                backend=self.spec.backend,
                simulated=self.settings.simulated,
                region=self.region,
                run_dir=str(run_dir),
                handle=RunHandle(plan=self.plan.to_json()),
            )
        )
        ctx = RunContext(run_id=run_id, run_dir=run_dir, cloud=AwsCloud(self.settings, self.region))
        self._write_job(ctx)
        return ctx

    def run(self, ctx: RunContext) -> int:
        """The whole lifecycle; returns 0, or raises (TrainingFailed when the command failed)."""
        return self._lifecycle(ctx, launch=True)

    def resume(self, ctx: RunContext) -> int:
        """Attach to a detached run: follow its log, pull back, tear down."""
        return self._lifecycle(ctx, launch=False)

    def _lifecycle(self, ctx: RunContext, *, launch: bool) -> int:
        outcome: RunState = RunState.FAILED
        exit_code: int | None = None
        handed_off = False  # --detach: the instance goes on without us
        steps = PhaseSteps(
            bring_up=lambda: self._bring_up(ctx),
            train=lambda: self.follow(ctx),
            pull=lambda: self._pull_phase(ctx),
            relaunch=lambda error: self._recover(ctx, error),
        )
        try:
            first = Phase.BRING_UP
            if launch:
                self._launch(ctx)
            else:
                lost = self.instance_lost(ctx)
                if lost is None:
                    first = Phase.TRAIN
                else:  # taken away while nobody followed it (a detached run)
                    self._recover(ctx, lost)
            if self.detach:
                run_phases(steps, first, until=Phase.TRAIN)
                handed_off = True
                grace = self.spec.watchdog.collect_grace_s
                self.reporter.info(
                    f"detached: training goes on; `cloudtrain attach {ctx.run_id}` to follow it, "
                    f"`cloudtrain down {ctx.run_id}` to stop it; the instance powers itself off "
                    f"{grace} s after the run ends unless something collects it, and at "
                    f"{iso(self._deadline(ctx))} regardless"
                )
                return 0
            exit_code = run_phases(steps, first)
            assert exit_code is not None
            outcome = RunState.SUCCEEDED if exit_code == 0 else RunState.FAILED
            if exit_code != 0:
                node = ctx.failed_node
                raise TrainingFailed(
                    f"the training command {f'of node {node.rank} ' if node else ''}exited with code "
                    f"{exit_code}",
                    hint=f"Its log is in {ctx.run_dir / 'logs' / (node.log_name if node else 'train.log')}.",
                )
            return 0
        except (KeyboardInterrupt, SystemExit) as e:
            outcome = RunState.CANCELLED
            exit_code = int(ExitCode.SIGTERM) if isinstance(e, SystemExit) else int(ExitCode.SIGINT)
            self.reporter.warn(
                "interrupted: pulling back what there is (Ctrl-C again to skip it), "
                "then terminating the instance"
            )
            self._salvage(ctx)
            raise
        except TrainingFailed:
            raise
        except CloudtrainError as e:
            self.ledger.add_event(ctx.run_id, "error", e.message)
            self._salvage(ctx)
            raise
        finally:
            if not handed_off:
                self.finish(ctx, outcome, exit_code)

    def finish(self, ctx: RunContext, outcome: RunState, exit_code: int | None) -> None:
        """Tear down (unless --keep), record the final state, write run.json.

        The state is recorded whatever teardown manages; what it could not remove is
        named (ledger events, a warning) and, when nothing else went wrong, raised."""
        problems: list[str] = []
        with shielded_from_signals(lambda: self._left_to_remove(ctx)):
            keep = self.keep and ctx.instance_id is not None and ctx.training_started
            if keep:
                self._keep(ctx)
            for session in (ctx.session, *(w.session for w in ctx.workers)):
                if session is not None:
                    session.close()
            if not keep:
                problems = teardown(ctx.cloud, self.ledger, ctx.run_id, ctx.handle)
            self._state(ctx, outcome, f"run {outcome.value}", ended_at=utcnow(), exit_code=exit_code)
            _final_log(ctx.run_dir)
            write_run_json(self.ledger, ctx.run_id, ctx.run_dir)
        if problems:
            error = CloudError(
                "teardown incomplete: " + "; ".join(problems),
                hint=f"Run `cloudtrain down {ctx.run_id}` to retry, or remove them in the EC2 console.",
            )
            if sys.exc_info()[1] is None:
                raise error
            self.reporter.warn(f"{error.message}. {error.hint}")

    def _left_to_remove(self, ctx: RunContext) -> str:
        """What the run still holds in the cloud, and the command that removes it."""
        held = [
            f"{what} {name}"
            for what, name in (
                *(("instance", i) for i in ctx.node_ids),
                ("placement group", ctx.handle.placement_group),
                ("security group", ctx.security_group_id),
                ("key pair", ctx.key_name),
                ("instance profile", ctx.instance_profile),
            )
            if name
        ]
        return (
            f"{', '.join(held)} (if this process is killed: `cloudtrain down {ctx.run_id}`)" if held else ""
        )

    def _keep(self, ctx: RunContext) -> None:
        """--keep: leave the instance, and have it power itself off at the deadline (budget.max_hours
        after the run started; else 24 h from now); its expiry tag says so too (for `gc`)."""
        if self.spec.budget.max_hours is not None:
            deadline = self._deadline(ctx)
        else:
            deadline = utcnow() + timedelta(hours=DEFAULT_DEADLINE_HOURS)
        assert ctx.session is not None and ctx.instance_id is not None
        try:
            self._agent(ctx).collected(keep_until=iso(deadline))
        except RemoteError as e:  # teardown must go on: the watchdog still ends it, only sooner
            deadline = min(deadline, utcnow() + timedelta(seconds=self.spec.watchdog.collect_grace_s))
            self.reporter.warn(f"could not tell the instance it is kept ({e.message})")
        try:
            ctx.cloud.set_run_expiry(ctx.run_id, deadline + timedelta(minutes=30), ctx.instance_profile)
        except CloudtrainError as e:  # the instance still powers itself off at the deadline
            self.reporter.warn(f"could not move the expiry tag ({e.message}): `gc` may end it early")
        self._record(ctx, kept_until=iso(deadline))
        self.reporter.warn(
            f"--keep: {ctx.instance_id} keeps running (and billing) until `cloudtrain down {ctx.run_id}` "
            f"or {iso(deadline)}, when it powers itself off"
        )

    def _deadline(self, ctx: RunContext) -> datetime:
        """When the run must end, whatever happens: budget.max_hours after it started (its
        first instance running), else DEFAULT_DEADLINE_HOURS; the watchdog enforces it."""
        run = self.ledger.get_run(ctx.run_id)
        started = (run.started_at if run else None) or utcnow()
        return started + timedelta(hours=self.spec.budget.max_hours or DEFAULT_DEADLINE_HOURS)

    def _launch(self, ctx: RunContext) -> None:
        assert self.plan is not None
        choice, nodes = self.plan.choice, self.spec.resources.nodes
        self._state(
            ctx,
            RunState.LAUNCHING,
            f"launching {f'{nodes} × ' if nodes > 1 else ''}{choice.instance.name} "
            f"({choice.lifecycle.value}, ${choice.price_per_hour:.4f}/h{' each' if nodes > 1 else ''}) "
            f"in {choice.zone or self.region}",
        )
        checkpoint_url = self.spec.checkpoint.s3_url(ctx.run_id)
        if checkpoint_url:  # before anything is created: a bucket that is not there is bad input
            ctx.cloud.check_bucket(s3_buckets([checkpoint_url])[0], f"{self.job_path}: checkpoint.s3")
        hours = self.spec.budget.max_hours or DEFAULT_DEADLINE_HOURS
        ctx.tags = tags = run_tags(
            ctx.run_id, self.settings.owner, utcnow() + timedelta(hours=hours, minutes=30)
        )
        ctx.key = key = ctx.cloud.ensure_key_pair(ctx.run_id, tags)
        self._record(ctx, key_name=key.name, key_path=str(key.path))
        ctx.image = image = self._choose_image(ctx)
        if nodes > 1:  # its instances close together, in one zone
            self._record(ctx, placement_group=ctx.cloud.create_placement_group(ctx.run_id, tags))
        self._record(
            ctx,
            security_group_id=ctx.cloud.create_security_group(
                ctx.run_id, caller_cidr(self.settings), tags, cluster=nodes > 1
            ),
            image=image.id,
            owner=self.settings.owner,  # what its tags say, whatever the host is called later
        )
        buckets = s3_buckets([d.src for d in self.spec.data if d.is_s3])
        writable = [checkpoint_url] if checkpoint_url else []
        if buckets or writable:  # the instance reaches S3 with its own role, never the user's keys
            profile = ctx.cloud.ensure_instance_profile(ctx.run_id, buckets, tags, writable)
            self._record(ctx, instance_profile=profile)
            reads = f"reads {', '.join(f's3://{b}' for b in buckets)}" if buckets else ""
            writes = f"keeps checkpoints in {checkpoint_url}" if writable else ""
            self.reporter.info(
                f"instance profile {ctx.instance_profile}: {'; '.join(filter(None, (reads, writes)))}"
            )
        if not checkpoint_url:
            say = self.reporter.warn if self.detach else self.reporter.info
            say(
                "no checkpoint.s3 prefix: outputs nobody collects within "
                f"{self.spec.watchdog.collect_grace_s} s of the run's end are lost when the instance "
                "powers itself off"
            )
        self._launch_instance(ctx, launch_offers(self.plan, MAX_LAUNCH_OFFERS), token=ctx.run_id)

    def _choose_image(self, ctx: RunContext) -> Image:
        """resources.image as named; by default the newest cloudtrain image of the installed
        recipe's version in the region, else (with a warning) the newest older one."""
        if self.spec.resources.image == BASE_IMAGE:  # the job environment is installed at boot
            image = ctx.cloud.base_image(None)
            self.reporter.info(
                f"resources.image: base: {image.name} ({image.id}); the {self.spec.backend} environment "
                "is installed at boot (slower than a cloudtrain image)"
            )
            return image
        if self.spec.resources.image:
            return ctx.cloud.resolve_image(self.spec.resources.image)
        from cloudtrain.cloud.simimage import recipe_version

        version = recipe_version()
        choice = ctx.cloud.choose_image(version)
        if not choice.current:
            self.reporter.warn(
                f"the image {choice.image.name} ({choice.image.id}) is of recipe version "
                f"{choice.version or 'unknown'}, not the installed {version}: it may lack what this "
                f"cloudtrain expects; `cloudtrain image build --region {self.region}` makes a current one"
            )
            self.ledger.add_event(
                ctx.run_id, "old-image", f"{choice.image.id} is of version {choice.version}"
            )
        return choice.image

    def _launch_instance(self, ctx: RunContext, offers: list[Offer], *, token: str) -> None:
        """Launch the first offer AWS has capacity for (``resources.nodes`` instances of it,
        all or none); record them and wait until they run."""
        assert self.plan is not None and ctx.image is not None and ctx.key is not None
        assert ctx.security_group_id is not None
        res = self.spec.resources
        image, key, tags = ctx.image, ctx.key, ctx.tags
        offer, ids = offers[0], []
        for attempt, offer in enumerate(offers, 1):
            request = LaunchRequest(
                run_id=ctx.run_id,
                instance_type=offer.instance.name,
                zone=offer.zone,
                spot=offer.lifecycle is Lifecycle.SPOT,
                max_price=res.max_price if offer.lifecycle is Lifecycle.SPOT else None,
                disk_gb=res.disk_gb,
                image=image,
                key=key,
                security_group_id=ctx.security_group_id,
                client_token=f"{token}-{attempt}",
                tags=tags,
                instance_profile=ctx.instance_profile,
                placement_group=ctx.handle.placement_group,
            )
            where = f"{offer.instance.name} ({offer.lifecycle.value}) in {offer.zone or self.region}"
            try:
                if res.nodes > 1:
                    ids = ctx.cloud.launch_cluster(request, res.nodes)
                else:
                    ids = [ctx.cloud.launch(request)]
                self._record(ctx, instance_id=ids[0])
                break
            except CapacityError as e:  # not worth waiting for: the next zone or type
                self.ledger.add_event(ctx.run_id, "no-capacity", f"{where}: {e.message}")
                if attempt == len(offers):
                    raise CapacityError(
                        f"no capacity for any of the {len(offers)} offers tried (last: {where})",
                        hint="Try later, allow more zones or GPUs, or set resources.fallback: on-demand.",
                    ) from e
                following = offers[attempt]
                self.reporter.warn(
                    f"no capacity for {where}; trying {following.instance.name} "
                    f"({following.lifecycle.value}) in {following.zone or self.region}"
                )
        for instance_id in ids:
            self.ledger.record_instance(
                InstanceRow(
                    id=instance_id,
                    run_id=ctx.run_id,
                    instance_type=offer.instance.name,
                    zone=offer.zone,
                    lifecycle=offer.lifecycle,
                    price_per_hour=offer.price_per_hour,
                    on_demand_per_hour=offer.on_demand_per_hour,
                    launched_at=utcnow(),
                    disk_gb=res.disk_gb,
                    ebs_per_gb_month=self.plan.ebs_per_gb_month,
                )
            )
        ctx.workers = []
        for rank, instance_id in enumerate(ids):
            launched = ctx.cloud.wait_running(instance_id)
            self.ledger.instance_running(instance_id, utcnow())
            if rank == 0:
                ctx.launched = launched
            else:
                ctx.workers.append(Node(rank, instance_id, launched))
        if ctx.relaunches == 0:
            self.ledger.update_run(ctx.run_id, started_at=utcnow())
        assert ctx.launched is not None
        if ctx.workers:
            self.reporter.info(
                f"{', '.join(ctx.node_ids)} are running in {ctx.launched.zone} "
                f"(node 0, the chief, is {ctx.instance_id})"
            )
        else:
            self.reporter.info(f"{ctx.instance_id} is running in {ctx.launched.zone}")

    # --- surviving interruptions --------------------------------------------------------

    def _bring_up(self, ctx: RunContext) -> None:
        """Provision, sync, restore the checkpoint, start training (Phase.BRING_UP); on
        several nodes, the workers in parallel with the chief, the training on all."""
        if not ctx.workers:
            self._provision(ctx)
            self._sync(ctx)
            self._push_checkpoint(ctx)
        else:
            said: dict[int, _Said] = {node.rank: _Said() for node in ctx.workers}
            failures: dict[int, BaseException] = {}

            def bring_up(node: Node) -> None:
                try:
                    self._bring_up_worker(ctx, node, said[node.rank])
                except BaseException as e:  # raised on the main thread, below
                    failures[node.rank] = e

            # Daemon threads: on Ctrl-C, or when the chief fails, nothing waits for them
            # (teardown ends the calls they are in).
            threads = [
                threading.Thread(target=bring_up, args=(n,), name=f"cloudtrain-node-{n.rank}", daemon=True)
                for n in ctx.workers
            ]
            for thread in threads:
                thread.start()
            self._provision(ctx)
            self._sync(ctx)
            self._push_checkpoint(ctx)
            for thread in threads:
                thread.join()
            for node in ctx.workers:  # what the workers said, from this thread
                said[node.rank].replay(self.reporter, f"node {node.rank}: ")
            for node in ctx.workers:
                failure = failures.get(node.rank)
                if isinstance(failure, CloudtrainError):
                    failure.message = f"node {node.rank} ({node.instance_id}): {failure.message}"
                if failure is not None:
                    raise failure
        self._start_training(ctx)

    def _bring_up_worker(self, ctx: RunContext, node: Node, reporter: Reporter) -> None:
        """A worker's provisioning, sync and checkpoint, on a thread of its own: what the
        chief's do, less the ledger (the main thread's) and the progress bars; what it
        would say goes to ``reporter``."""
        assert ctx.key_path is not None
        node.launched, endpoint = ssh_endpoint(
            ctx.cloud, node.instance_id, ctx.key_path, loopback_only=self.settings.loopback_hosts
        )
        node.session = Session(endpoint, give_up=lambda: self.instance_lost(ctx)).connect()
        agent = self._remote_agent(node.session, self.spec.backend)
        agent.install()
        if self.spec.resources.image == BASE_IMAGE:
            gpu = self.settings.instance_gpus
            run_recipe(node.session, [self.spec.backend], reporter, node.instance_id, gpu=gpu)
        node.session.run(f"mkdir -p {REMOTE_WORKDIR}")
        verify_backend(agent, self._agent_config(ctx, node.rank), gpu=self.settings.instance_gpus)
        self._sync_to(node.session, progress=None)
        self._fetch_s3(node.session, reporter)
        self._restore_checkpoint(ctx, node.session, reporter, progress=None)
        log.info("node %d (%s) is ready", node.rank, node.instance_id)

    def _agent_config(self, ctx: RunContext, rank: int) -> AgentConfig:
        """The job's options for node ``rank``'s agent: on several nodes, with its cluster
        variables (cluster.py), the nodes named by their private addresses."""
        node = None
        if ctx.workers:
            assert ctx.launched is not None
            launched = [ctx.launched, *(w.launched for w in ctx.workers)]
            missing = [i.id for i in launched if not i.private_ip]
            if missing:
                raise RemoteError(f"{', '.join(missing)}: no private address for the other nodes to reach")
            node = node_environment(ctx.run_id, rank, [str(i.private_ip) for i in launched])
        return AgentConfig.from_spec(self.spec, ctx.run_id, self.region, gpus=self._gpus(ctx), node=node)

    def _pull_phase(self, ctx: RunContext) -> None:
        self._state(ctx, RunState.PULLING, "pulling back outputs and logs")
        self.pull(ctx)

    def instance_lost(self, ctx: RunContext) -> InstanceLost | None:
        """The instance (on several nodes, the first of them) AWS has taken away, if any (a
        failed describe is not proof of that). A worker whose command ended is past caring."""
        live = [ctx.instance_id, *(w.instance_id for w in ctx.workers if w.exit_code is None)]
        for instance_id in filter(None, live):
            try:
                state = ctx.cloud.describe(instance_id).state
            except CloudtrainError:
                continue
            if state in LOST_STATES:
                return InstanceLost(instance_id, state)
        return None

    def _recover(self, ctx: RunContext, error: RemoteError) -> None:
        """After a remote failure: re-raise it unless the instance was lost; else confirm the
        old one is gone (one instance per run at a time) and launch the next offer."""
        lost = error if isinstance(error, InstanceLost) else self.instance_lost(ctx)
        if lost is None or not self._ready_to_relaunch(ctx):
            raise error
        assert ctx.instance_id is not None and self.plan is not None
        self.ledger.add_event(ctx.run_id, "interrupted", lost.message)
        if ctx.launched is not None:
            ctx.lost.append((ctx.launched.instance_type, ctx.launched.zone))
        else:  # a resumed run: the ledger knows what it was
            row = next(i for i in self.ledger.instances(ctx.run_id) if i.id == lost.instance_id)
            ctx.lost.append((row.instance_type, row.zone))
        for session in (ctx.session, *(w.session for w in ctx.workers)):
            if session is not None:
                session.close()
        ctx.session = None
        # the whole group goes, together: the others cannot train on without it
        if ctx.workers:
            ctx.cloud.ask_to_terminate(ctx.node_ids)
        for instance_id in sorted(ctx.node_ids, key=lambda i: i != lost.instance_id):
            self.ledger.instance_terminated(instance_id, ctx.cloud.terminate(instance_id))
        ctx.workers = []
        relaunches = ctx.relaunches + 1
        if self.spec.resources.nodes > 1 and relaunches <= MAX_RELAUNCHES:
            self._new_placement_group(ctx, relaunches)
        if relaunches > MAX_RELAUNCHES:
            raise CloudError(
                f"interrupted {relaunches} times; giving up after {MAX_RELAUNCHES} relaunches",
                hint="Spot capacity is scarce for this GPU now: try other zones or GPUs, or spot: false.",
            ) from error
        self._record(
            ctx, relaunches=relaunches, log_base=ctx.log_base + ctx.log_offset, training_started=False
        )
        ctx.log_offset = ctx.metrics_offset = 0
        offers = [
            o
            for o in launch_offers(self.plan, MAX_LAUNCH_OFFERS + len(ctx.lost))
            if (o.instance.name, o.zone) not in ctx.lost
        ][:MAX_LAUNCH_OFFERS]
        if not offers:
            raise CloudError(
                "no other offer to relaunch on after the interruption", hint="Allow more zones or GPUs."
            ) from error
        nodes = self.spec.resources.nodes
        each = f"{nodes} × " if nodes > 1 else ""
        self.reporter.warn(
            f"{lost.message}; relaunching ({ctx.relaunches}/{MAX_RELAUNCHES}) on "
            f"{each}{offers[0].instance.name} in {offers[0].zone or self.region}"
        )
        self._state(ctx, RunState.RECOVERING, f"relaunching after an interruption of {lost.instance_id}")
        self._launch_instance(ctx, offers, token=f"{ctx.run_id}-r{ctx.relaunches}")

    def _new_placement_group(self, ctx: RunContext, launch: int) -> None:
        """A group's relaunch goes into a placement group of its own (a cluster group stays
        in one zone; the relaunch may go to another); the old one goes now if it can, else
        at teardown (its tags find it)."""
        old = ctx.handle.placement_group
        group = ctx.cloud.create_placement_group(ctx.run_id, ctx.tags, launch=launch)
        self._record(ctx, placement_group=group)
        if old:
            try:
                ctx.cloud.delete_placement_group(old, attempts=1)
            except CloudtrainError as e:
                log.info("placement group %s is left for teardown: %s", old, e.message)

    def _ready_to_relaunch(self, ctx: RunContext) -> bool:
        """Whether a relaunch can go ahead; for a resumed run (`attach`), first gather what
        the first launch had made: a plan of today's offers, the image, key pair and tags."""
        if self.plan is None:
            if self.replan is None:
                return False
            self.plan = self.replan()
        if ctx.image is None:
            ctx.image = ctx.cloud.resolve_image(ctx.handle.image or self.spec.resources.image)
        if ctx.key is None and ctx.key_name and ctx.key_path:
            ctx.key = KeyPair(ctx.key_name, ctx.key_path)
        if not ctx.tags:
            hours = self.spec.budget.max_hours or DEFAULT_DEADLINE_HOURS
            ctx.tags = run_tags(
                ctx.run_id, self.settings.owner, utcnow() + timedelta(hours=hours, minutes=30)
            )
        return ctx.key is not None and ctx.security_group_id is not None

    def _push_checkpoint(self, ctx: RunContext) -> None:
        """Put the run's last checkpoint onto the instance, training resumes from it: the copy
        at home, or the one in S3 (``checkpoint.s3``) when that is further on (e.g. after
        `attach`, when nothing was copying it home)."""
        if ctx.session is None:
            return
        epoch, source = self._restore_checkpoint(
            ctx,
            ctx.session,
            self.reporter,
            progress=lambda done, total: self.reporter.transfer("restoring the checkpoint", done, total),
        )
        if epoch is not None:
            message = f"restoring the checkpoint of epoch {epoch} from {source}"
            self.ledger.add_event(ctx.run_id, "restore", message)
            self.reporter.info(message)

    def _restore_checkpoint(
        self,
        ctx: RunContext,
        session: Session,
        reporter: Reporter,
        progress: Callable[[int, int], None] | None,
    ) -> tuple[Any, str]:
        """The run's last checkpoint onto the instance at ``session`` (every node of a run on
        several gets the chief's); (its epoch, where it came from), (None, "") for none."""
        epoch, source = None, ""
        found = last_checkpoint(ctx.run_dir)
        if found is not None:
            from cloudtrain.remote.sync import upload_tree

            upload_tree(session, found[0], REMOTE_CHECKPOINT, progress)
            epoch, source = found[1].get("epoch"), "the copy at home"
        url = self.spec.checkpoint.s3_url(ctx.run_id)
        if url:
            report = self._remote_agent(session, self.spec.backend).restore_checkpoint(url, self.region)
            if "error" in report:
                reporter.warn(f"the checkpoint in {url} was not restored: {report['error']}")
            elif report.get("source") == "s3":
                epoch, source = report.get("epoch"), url
        return epoch, source

    def _pull_checkpoint(self, session: Session, dest: Path) -> None:
        cli = self.agent_cli
        pull_checkpoint(session, dest, remote_python=cli.python, remote_agent_path=cli.path)

    def _keeper_event(self, kind: str, message: str) -> None:
        """From the keeper's thread: shown now, recorded by the main thread later."""
        self._keeper_events.append((kind, message, utcnow()))
        self.reporter.info(message)

    def _flush_keeper_events(self, ctx: RunContext) -> None:
        while self._keeper_events:
            kind, message, when = self._keeper_events.pop(0)
            self.ledger.add_event(ctx.run_id, kind, message, at=when)

    def _provision(self, ctx: RunContext) -> None:
        assert ctx.launched is not None and ctx.instance_id and ctx.key_path
        self._state(ctx, RunState.PROVISIONING, "verifying the host key, configuring the backend")
        ctx.launched, endpoint = ssh_endpoint(
            ctx.cloud, ctx.instance_id, ctx.key_path, loopback_only=self.settings.loopback_hosts
        )
        self._record(
            ctx,
            ssh={
                "host": endpoint.host,
                "port": endpoint.port,
                "user": endpoint.user,
                "fingerprints": sorted(endpoint.fingerprints),
            },
        )
        try:
            ctx.session = Session(endpoint, give_up=lambda: self.instance_lost(ctx)).connect()
        except HostKeyMismatch:
            self.ledger.add_event(ctx.run_id, "host-key-mismatch", "refused the instance's host key")
            raise
        agent = self._agent(ctx)
        agent.install()
        backend = self.spec.backend
        if self.spec.resources.image == BASE_IMAGE:
            self.reporter.info(f"installing the {backend} environment (resources.image: base)")
            run_recipe(
                ctx.session, [backend], self.reporter, ctx.instance_id, gpu=self.settings.instance_gpus
            )
        ctx.session.run(f"mkdir -p {REMOTE_WORKDIR}")
        report = verify_backend(agent, self._agent_config(ctx, 0), gpu=self.settings.instance_gpus)
        self._record(ctx, backend_report=report)
        self.reporter.info(describe_backend(report))

    def _gpus(self, ctx: RunContext) -> int:
        """The GPU count of the instance type launched (a relaunch may take another offer)."""
        assert self.plan is not None and ctx.launched is not None  # set by _launch, or _recover's replan
        counts = {o.instance.name: o.instance.gpu_count for o in self.plan.offers}
        return counts.get(ctx.launched.instance_type, self.plan.choice.instance.gpu_count)

    def _sync(self, ctx: RunContext) -> None:
        assert ctx.session is not None
        self._state(ctx, RunState.SYNCING, "syncing the workdir and data")
        report = self._sync_to(
            ctx.session, progress=lambda done, total: self.reporter.transfer("syncing", done, total)
        )
        for warning in report.warnings:
            self.reporter.warn(warning)
        self.reporter.info(_describe_sync(report))
        self._fetch_s3(ctx.session, self.reporter)

    def _sync_to(self, session: Session, progress: Callable[[int, int], None] | None) -> SyncReport:
        """The workdir and local data onto the instance at ``session``."""
        from cloudtrain.remote.sync import sync_workdir

        cli = self.agent_cli
        return sync_workdir(
            session,
            self.spec.workdir,
            REMOTE_WORKDIR,
            data_sources=self.spec.data,
            exclude=[self.out_dir, self.settings.home],
            cache_dir=self.settings.home / "cache",
            remote_python=cli.python,
            remote_agent_path=cli.path,
            progress=progress,
        )

    def _fetch_s3(self, session: Session, reporter: Reporter) -> None:
        """Each S3 data source, fetched on the instance with the instance profile's credentials
        (nothing of the controller's goes along)."""
        for source in self.spec.data:
            if not source.is_s3:
                continue
            dst = f"{REMOTE_WORKDIR}/{source.dst.strip('/')}"
            report = self._remote_agent(session, self.spec.backend).fetch_s3(source.src, dst, self.region)
            if "error" in report:
                raise RemoteError(
                    f"fetching {source.src} on the instance failed: {report['error']}",
                    hint=str(report.get("hint") or "See the instance profile's policy and the bucket's."),
                )
            reporter.info(
                f"fetched {source.src} -> {source.dst}: {report.get('files', 0)} files "
                f"({int(report.get('bytes', 0)) / 1e6:.1f} MB), {report.get('skipped', 0)} already there"
            )

    def _start_training(self, ctx: RunContext) -> None:
        assert ctx.session is not None
        missing = [name for name in self.spec.secrets if name not in self.secrets]
        if missing:  # checked before launch too; this guards the API
            raise InputError(f"secrets not set locally: {', '.join(missing)}")
        nodes = f" on {len(ctx.node_ids)} nodes" if ctx.workers else ""
        self._state(ctx, RunState.RUNNING, f"running{nodes}: {self.spec.run}")
        for agent in (*self._worker_agents(ctx), self._agent(ctx)):  # the workers first: the chief leads
            agent.start(self.spec.run, self.spec.setup, self.secrets)
        self._record(ctx, training_started=True)  # `logs -f` from elsewhere waits for this
        self._start_watchdog(ctx)
        if self.watcher is not None:
            self.watcher.training_started(ctx.node_ids, ctx.relaunches)

    def _worker_agents(self, ctx: RunContext, *, running: bool = False) -> list[RemoteAgent]:
        """The agents on a run's workers (none on one node); ``running``: on those whose
        command has not ended."""
        sessions = [w.session for w in ctx.workers if not (running and w.exit_code is not None)]
        assert all(s is not None for s in sessions)
        return [self._remote_agent(s, self.spec.backend) for s in sessions if s is not None]

    def _start_watchdog(self, ctx: RunContext) -> None:
        """The instance's own guard (agent/watchdog.py): it powers off at the deadline, or when
        nobody collects the ended run within the grace; the controller need not stay up.
        Each worker has one too, which saves nothing (outputs come from the chief)."""
        deadline = self._deadline(ctx)
        for agent, chief in (*((a, False) for a in self._worker_agents(ctx)), (self._agent(ctx), True)):
            agent.watchdog(
                iso(deadline),
                self.spec.watchdog.collect_grace_s,
                self.spec.outputs if chief else (),
                self.spec.checkpoint.s3_url(ctx.run_id) if chief else None,
                self.region,
                max_idle_s=self.spec.budget.max_idle_minutes * 60,
                on_idle=self.spec.budget.on_idle,
            )
        ctx.renewed = time.monotonic()
        how = (
            "budget.max_hours" if self.spec.budget.max_hours else "moved on while cloudtrain follows the run"
        )
        self.reporter.info(f"deadline {iso(deadline)} ({how})")

    def renew_deadline(self, ctx: RunContext) -> None:
        """Without budget.max_hours the deadline is a dead-man's switch: every RENEW_S while a
        controller follows the run (`run`, `attach`, `logs -f`), it moves to
        DEFAULT_DEADLINE_HOURS from now, on the instance (its watchdog) and in the run's
        ``cloudtrain:expires`` tags (`gc`). A failure waits for the next round."""
        if self.spec.budget.max_hours is not None or ctx.handle.kept_until:
            return
        if ctx.renewed is not None and time.monotonic() - ctx.renewed < RENEW_S:
            return
        deadline = utcnow() + timedelta(hours=DEFAULT_DEADLINE_HOURS)
        try:
            for agent in (self._agent(ctx), *self._worker_agents(ctx, running=True)):
                agent.renew(iso(deadline))
            ctx.cloud.set_run_expiry(ctx.run_id, deadline + timedelta(minutes=30), ctx.instance_profile)
        except (RemoteError, CloudError) as e:
            log.info("could not move the deadline on: %s", e.message)
            return
        ctx.renewed = time.monotonic()
        log.info("deadline moved to %s", iso(deadline))

    def follow(self, ctx: RunContext) -> int:
        """Stream the training log until it ends (reconnecting after drops); return its exit code.

        Beside it, a CheckpointKeeper copies each new checkpoint home. A drop on an
        instance AWS has taken away raises InstanceLost at once (the caller relaunches)."""
        assert ctx.session is not None
        logs = ctx.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        with (
            open(logs / "train.log", "ab") as logfile,
            CheckpointKeeper(
                ctx.session,
                ctx.run_dir,
                self._pull_checkpoint,
                notice_path=f"{REMOTE_RUN_DIR}/notice.json",
                on_event=self._keeper_event,
            ) as keeper,
        ):
            logfile.truncate(ctx.log_base + ctx.log_offset)
            partial = b""
            budget_checked = shown = time.monotonic()
            limits = self.spec.budget
            if limits.max_cost_usd is not None or limits.max_hours is not None:
                shown -= BUDGET_SHOW_S  # with a budget, the spending is shown from the start

            def sink(data: bytes) -> None:  # secrets masked already
                nonlocal partial, budget_checked
                logfile.write(data)
                logfile.flush()
                ctx.log_offset += len(data)
                self.reporter.log(data)
                if time.monotonic() - budget_checked > 2.0:
                    budget_checked = time.monotonic()
                    self._check_budget(ctx, keeper)
                if self.watcher is not None:
                    *lines, partial = (partial + data).split(b"\n")
                    for line in lines:
                        self.watcher.log_line(ctx.node_ids, ctx.relaunches, line.decode("utf-8", "replace"))

            def between_rounds() -> None:
                nonlocal shown
                failed = self._watch_workers(ctx)
                if failed is not None:
                    raise _WorkerFailed(failed)
                self.renew_deadline(ctx)
                self._fetch_metrics(ctx)
                self._check_budget(ctx, keeper)
                if time.monotonic() - shown >= BUDGET_SHOW_S:
                    shown = time.monotonic()
                    self.reporter.info(self._spending(ctx))

            def on_beat(beat: Beat) -> None:
                nonlocal budget_checked
                done, last = _epochs_done(beat), _epochs_done(ctx.beat)
                ctx.beat = beat
                if done != last and done[1]:
                    self._fetch_metrics(ctx)  # an epoch ended: its line now, not at the round's end
                self._check_idle(ctx, beat, keeper)
                if time.monotonic() - budget_checked > 2.0:
                    budget_checked = time.monotonic()
                    self._check_budget(ctx, keeper)
                self.reporter.live(self.live_status(ctx))

            def dropped(error: RemoteError) -> None:
                self.reporter.warn(f"lost the connection to {ctx.instance_id} ({error.reason}); reconnecting")
                log.info("the log stream failed: %s (%s)", error.message, error.debug)

            follower = LogFollower(
                self._agent(ctx),
                ctx.log_offset,
                sink,
                secrets=self.secrets.values(),
                lost=lambda: self.instance_lost(ctx),
                reconnects=STREAM_RECONNECTS,
                on_drop=dropped,
                on_beat=on_beat,
            )
            try:
                try:
                    code = follower.follow(between=between_rounds)
                except _WorkerFailed as e:
                    return self._worker_failed(ctx, e.node)
                self._fetch_metrics(ctx)  # the last epochs' lines, before the pull-back's
                keeper.final_round(ctx.session)  # the training's last checkpoint comes home
                if not ctx.workers:
                    return code
                try:
                    failed = self._watch_workers(ctx, wait_s=WORKERS_END_S if code == 0 else 10.0)
                except InstanceLost as e:
                    if code != 0:  # a node taken away fails the others' collective steps
                        raise
                    self.reporter.warn(f"{e.message} after the chief's command succeeded: its log may be cut")
                    failed = None
                lost = self.instance_lost(ctx) if code != 0 else None
                if lost is not None:
                    raise lost
                unended = [w for w in ctx.workers if w.exit_code is None]
                if code == 0 and unended:
                    self.reporter.warn(
                        f"node {', '.join(str(w.rank) for w in unended)} still running {WORKERS_END_S:.0f} s "
                        "after the chief's command succeeded: stopped with the run"
                    )
                if failed is not None:  # said either way; the chief's own failure is the run's
                    worker_code = self._worker_failed(ctx, failed, blamed=code == 0)
                    return worker_code if code == 0 else code
                return code
            finally:
                self._flush_keeper_events(ctx)

    def _watch_workers(self, ctx: RunContext, *, wait_s: float = 0.0) -> Node | None:
        """Each worker's new log bytes into ``logs/node-K.log``, and its state; the first
        whose command failed. ``wait_s``: as long as that for every worker to end. A worker
        AWS took away raises InstanceLost (the group is relaunched)."""
        until = time.monotonic() + wait_s
        while True:
            for node in ctx.workers:
                if node.exit_code is None:
                    self._watch_worker(ctx, node)
            failed = next((n for n in ctx.workers if n.exit_code not in (None, 0)), None)
            if failed is not None:  # a node taken away makes the others fail: that is no failure
                lost = self.instance_lost(ctx)
                if lost is not None:
                    raise lost
                return failed
            if all(n.exit_code is not None for n in ctx.workers) or time.monotonic() >= until:
                return None
            time.sleep(2.0)

    def _watch_worker(self, ctx: RunContext, node: Node) -> None:
        assert node.session is not None
        agent = self._remote_agent(node.session, self.spec.backend)
        data = bytearray()
        try:
            status = agent.status()  # first: an ended command's log is whole by then
            agent.tail(node.log_offset, data.extend)
        except RemoteError as e:
            lost = self.instance_lost(ctx)
            if lost is not None:
                raise lost from e
            log.info("node %d (%s): %s", node.rank, node.instance_id, e.message)
            return  # the next round tries again
        node.log_offset += len(data)
        if node.redactor is None:
            node.redactor = LogRedactor(self.secrets.values())
        code = status.get("exit_code")
        masked = node.redactor.feed(bytes(data)) + (node.redactor.flush() if code is not None else b"")
        logs = ctx.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / node.log_name, "ab") as logfile:
            logfile.write(masked)
        if code is not None:
            node.exit_code = int(code)
            with suppress(RemoteError):  # its log is home: its watchdog's grace starts now
                agent.collected()
        elif not status.get("running"):
            lost = self.instance_lost(ctx)
            if lost is not None:
                raise lost
            raise RemoteError(f"node {node.rank}'s training supervisor is gone without an exit code")

    def _worker_failed(self, ctx: RunContext, node: Node, *, blamed: bool = True) -> int:
        """A worker's command failed: say so, with its log's last line; ``blamed``: the run
        ends with its exit code."""
        assert node.exit_code is not None
        if blamed:
            ctx.failed_node = node
        lines = _last_lines(ctx.run_dir / "logs" / node.log_name, 1)
        message = (
            f"node {node.rank} ({node.instance_id}): the training command exited with code {node.exit_code}"
        )
        self.ledger.add_event(ctx.run_id, "node-failed", message)
        self.reporter.warn(f"{message}{f': {lines[-1]}' if lines else ''}")
        return node.exit_code

    def _fetch_metrics(self, ctx: RunContext) -> None:
        """Bring the epochs finished since the last call home (metrics.py), a line each on
        the console; a failure waits for the next call."""
        try:
            data = self._agent(ctx).metrics(ctx.metrics_offset)
        except RemoteError as e:
            log.info("could not fetch the metrics: %s", e.message)
            return
        ctx.metrics_offset += len(data)
        new = metrics.add(ctx.run_dir, data)
        status = (
            self.live_status(ctx) if new and ctx.beat and (ctx.beat.progress or {}).get("active") else None
        )
        for row in new:
            more = f" · {status.money()}" if status and row is new[-1] else ""
            self.reporter.info(metrics.summary(row) + more)
        if status is not None and status.projected_usd is not None:
            self._record_estimate(ctx, status.projected_usd)

    def _record_estimate(self, ctx: RunContext, projected_usd: float) -> None:
        """The run's cost as projected after its first epoch (once per run, relaunches
        included): `run` and `cost-report` put it beside the bill."""
        run = self.ledger.get_run(ctx.run_id)
        if run is None or run.projected_usd is not None:
            return
        self.ledger.update_run(ctx.run_id, projected_usd=round(projected_usd, 6))
        self.ledger.add_event(ctx.run_id, "estimate", f"projected ${projected_usd:.4f} after the first epoch")

    def _check_idle(self, ctx: RunContext, beat: Beat, keeper: CheckpointKeeper) -> None:
        """The stall guard: no progress (a step of a hooked Keras call, log output) for
        ``budget.max_idle_minutes`` is an ``idle`` event and a warning, once until progress
        comes again; inside fit/evaluate/predict, unless ``on_idle: warn``, a budget stop."""
        limits = self.spec.budget
        if beat.idle_s is None or beat.idle_s < limits.max_idle_minutes * 60:
            ctx.idle_said = False
            return
        if ctx.idle_said:
            return
        ctx.idle_said = True
        progress = beat.progress or {}
        inside = progress.get("call") if progress.get("active") else None
        where = f"inside {inside}" if inside else "outside fit, evaluate and predict"
        message = (
            f"no progress for {beat.idle_s:.0f} s ({where}; budget.max_idle_minutes: "
            f"{limits.max_idle_minutes:g})"
        )
        self.ledger.add_event(ctx.run_id, "idle", message)
        if not inside or limits.on_idle == "warn":
            self.reporter.warn(f"{message}: the run goes on")
            return
        self.reporter.warn(f"{message}: stopping the run (its last checkpoint and outputs come home first)")
        assert ctx.session is not None
        with suppress(RemoteError):
            keeper.final_round(ctx.session)
        raise BudgetError(
            f"the training stalled: {message}",
            hint="See the end of its log for where it hung. If it was only slow, raise "
            f"budget.max_idle_minutes, or set budget.on_idle: warn, in {self.job_path or 'job.yaml'}.",
        )

    def live_status(self, ctx: RunContext) -> LiveStatus:
        """Where the run stands now, for a live view: its instance, the fit's progress and ETA,
        the dollars so far and projected at this pace, the budget left."""
        run = self.ledger.get_run(ctx.run_id)
        started = run.started_at if run else None
        instances = self.ledger.instances(ctx.run_id)
        now = utcnow()
        spent = budget.spent_usd(instances, now)
        beat = ctx.beat
        progress = beat.progress if beat else None
        rows = metrics.series(ctx.run_dir) if progress else []
        eta = metrics.eta_s(rows, progress)
        running = [i for i in instances if i.running_at is not None and i.terminated_at is None]
        instance = None
        if running:
            i = running[-1]
            each = f"{len(running)} × " if len(running) > 1 else ""
            instance = (
                f"{each}{i.instance_type} in {i.zone or '?'}, {i.lifecycle.value} ${i.price_per_hour:.4f}/h"
                f"{' each' if each else ''}"
            )
        return LiveStatus(
            run_id=ctx.run_id,
            state=run.state if run else RunState.RUNNING,
            elapsed_s=budget.hours_since(started, now) * 3600,
            instance=instance,
            progress=progress,
            metrics=dict(rows[-1]["logs"]) if rows else {},
            eta_s=eta,
            spent_usd=spent,
            projected_usd=None if eta is None else budget.spent_usd(instances, now + timedelta(seconds=eta)),
            budget_left=budget.left(self.spec.budget, started, instances, now),
            idle_s=beat.idle_s if beat else None,
        )

    def _agent(self, ctx: RunContext) -> RemoteAgent:
        """The agent on the run's instance, over its session."""
        assert ctx.session is not None
        return self._remote_agent(ctx.session, self.spec.backend)

    def _spending(self, ctx: RunContext) -> str:
        run = self.ledger.get_run(ctx.run_id)
        return budget.describe(
            self.spec.budget, run.started_at if run else None, self.ledger.instances(ctx.run_id), utcnow()
        )

    def _check_budget(self, ctx: RunContext, keeper: CheckpointKeeper) -> None:
        """Raise BudgetError once a limit of ``budget:`` is reached, after copying the last
        checkpoint home (the lifecycle then pulls back what there is and tears down)."""
        limits = self.spec.budget
        if limits.max_cost_usd is None and limits.max_hours is None:
            return
        run = self.ledger.get_run(ctx.run_id)
        reason = budget.breach(
            limits, run.started_at if run else None, self.ledger.instances(ctx.run_id), utcnow()
        )
        if reason is None:
            return
        self.ledger.add_event(ctx.run_id, "budget", reason)
        self.reporter.warn(f"{reason}: stopping the run (its last checkpoint and outputs come home first)")
        assert ctx.session is not None
        with suppress(RemoteError):
            keeper.final_round(ctx.session)
        raise BudgetError(
            reason, hint=f"Raise the limit in the job file's budget: ({self.job_path or 'job.yaml'})."
        )

    def pull(self, ctx: RunContext) -> None:
        """Outputs into the run folder, and the log's last bytes."""
        assert ctx.session is not None
        from cloudtrain.remote.pull import pull

        if self.spec.outputs:
            cli = self.agent_cli
            report = pull(
                ctx.session,
                REMOTE_WORKDIR,
                self.spec.outputs,
                ctx.run_dir,
                remote_python=cli.python,
                remote_agent_path=cli.path,
                progress=lambda done: self.reporter.transfer("pulling back outputs", done, None),
            )
            for skipped in report.skipped:
                self.reporter.warn(f"not pulled: {skipped}")
        logs = ctx.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / "train.log", "ab") as logfile:
            logfile.truncate(ctx.log_base + ctx.log_offset)
            redactor = LogRedactor(self.secrets.values())
            self._agent(ctx).tail(ctx.log_offset, lambda data: logfile.write(redactor.feed(data)))
            logfile.write(redactor.flush())
        self._fetch_metrics(ctx)
        metrics.write_csv(ctx.run_dir)
        self._plot(ctx)
        # The watchdog's grace starts again from here (see agent/watchdog.py).
        self._agent(ctx).collected()
        try:  # the workers' logs: they hold no outputs
            self._watch_workers(ctx)
            for agent in self._worker_agents(ctx, running=True):
                agent.collected()
        except RemoteError as e:
            self.reporter.warn(f"the workers' logs may lack their last lines: {e.message}")

    def _plot(self, ctx: RunContext) -> None:
        """metrics.png beside metrics.csv, when matplotlib is there (the ``plot`` extra)."""
        from cloudtrain.plot import write_png

        try:
            write_png(ctx.run_dir)
        except InputError as e:  # no matplotlib: metrics.csv has the numbers
            log.info("no metrics.png: %s", e.message)
            if not ctx.plot_said:
                ctx.plot_said = True
                self.reporter.info(f"no metrics.png: {e.message} ({e.hint})")
        except Exception as e:  # a picture never fails a run: the numbers are in metrics.csv
            log.warning("could not draw metrics.png: %s: %s", type(e).__name__, e)

    def _salvage(self, ctx: RunContext) -> None:
        """After an interruption or error: pull back what there is, on a fresh connection
        (the old one may be stuck mid-read), within ``settings.salvage_pull_s``; teardown
        never waits longer than that. A second Ctrl-C skips it."""
        if ctx.session is None or not ctx.training_started:
            return
        session = ctx.session
        failures: list[Exception] = []

        def pull_back() -> None:  # no ledger here: its connection belongs to the main thread
            try:
                session.reconnect(deadline_s=30)
                self.pull(ctx)
            except Exception as e:
                failures.append(e)

        worker = threading.Thread(target=pull_back, name="cloudtrain-salvage", daemon=True)
        worker.start()
        worker.join(self.settings.salvage_pull_s)
        if worker.is_alive():
            message = f"pulling back took over {self.settings.salvage_pull_s:.0f} s: gave up on it"
            self.ledger.add_event(ctx.run_id, "salvage-timeout", message)
            self.reporter.warn(message)
        for failure in failures:  # named, never raised over the error that brought us here
            self.ledger.add_event(ctx.run_id, "salvage-failed", f"pulling back failed: {failure}")

    def _write_job(self, ctx: RunContext) -> None:
        """The resolved spec (secrets are names only, never values)."""
        data = self.spec.model_dump(mode="json")
        (ctx.run_dir / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


class _Said(Reporter):
    """What a worker's bring-up would say, kept for the main thread to say (a live console
    is drawn from one thread); transfer and step bars are dropped."""

    def __init__(self) -> None:
        self.said: list[tuple[str, str]] = []

    def info(self, message: str) -> None:
        self.said.append(("info", message))

    def warn(self, message: str) -> None:
        self.said.append(("warn", message))

    def replay(self, reporter: Reporter, prefix: str) -> None:
        for kind, message in self.said:
            (reporter.warn if kind == "warn" else reporter.info)(prefix + message)


class _WorkerFailed(Exception):
    """A worker's command failed: the chief's log stops being followed."""

    def __init__(self, node: Node) -> None:
        super().__init__(f"node {node.rank} failed")
        self.node = node


def _last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` non-blank lines of a log (none if it is not there)."""
    try:
        text = path.read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError:
        return []
    return [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()][-count:]


def _final_log(run_dir: Path) -> None:
    """The ended run's train.log with each Keras bar as its final state (logbars.py). Only
    now: while the run goes, the file's size is the log's offset on the instance."""
    from cloudtrain.logbars import collapse_file

    try:
        collapse_file(run_dir / "logs" / "train.log")
    except OSError as e:
        log.warning("could not tidy %s: %s", run_dir / "logs" / "train.log", e)


def _epochs_done(beat: Beat | None) -> tuple[Any, Any]:
    """(fit, epochs done) in a heartbeat's progress."""
    progress = (beat.progress if beat else None) or {}
    return progress.get("fit"), progress.get("done")


def _describe_sync(report: SyncReport) -> str:
    return (
        f"synced {report.files_total} files: {report.files_sent} sent ({report.bytes_sent / 1e6:.1f} MB), "
        f"{report.files_deleted} deleted, in {report.seconds:.1f} s"
    )
