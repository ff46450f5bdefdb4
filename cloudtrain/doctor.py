"""``cloudtrain doctor``: check what a run needs, and say how to fix what is missing.

One job: run the checks and return findings (a frozen ``Report``); the CLI renders
them. Nothing here prints or exits. Every check turns its own failure into a finding,
so one broken check never hides the others:

- ``simulator`` (dry-run only): the local simulated cloud, started as ``plan --dry-run`` does;
- ``credentials``: where boto3 finds credentials, and whose they are (STS GetCallerIdentity);
- ``region``: the region and where it came from; the price catalog must know it;
- ``keys``: ``$CLOUDTRAIN_HOME/keys`` is 0700 and every private key in it 0600;
- ``quota.*``: the EC2 vCPU quotas of the GPU families (Service Quotas), spot and on-demand;
  where Service Quotas cannot be asked (no permission, no endpoint, the simulated AWS),
  a warning that says so (``check_plan_quota``: the same for a plan's choice, all its nodes,
  as ``plan`` shows it);
- ``image``: the cloudtrain image (``cloudtrain-gpu-*``, owned by the account) in the region;
- ``leftovers``: cloudtrain instances and key pairs still there for runs that ended;
- ``sim-image``, ``sim-env.<name>`` (dry-run only): the simulated image, its job
  environments and the Python each one runs; ``python3.7`` where the image module can
  look for the Python the theano environment is built from.

The AWS checks go through the same cloud layer as a run; with dry-run, that layer's
endpoint is the simulator (an endpoint swap, not a code path).
"""

from __future__ import annotations

import logging
import shlex
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudtrain.catalog import Catalog, load_catalog
from cloudtrain.errors import CloudtrainError
from cloudtrain.records import Lifecycle
from cloudtrain.settings import DEFAULT_REGION, Settings

if TYPE_CHECKING:
    from cloudtrain.cloud.aws import AwsCloud
    from cloudtrain.planner import Plan

log = logging.getLogger(__name__)

# doctor reports; it does not wait: two tries per AWS call, not the runs' eight.
MAX_ATTEMPTS = 2
BUILD_IMAGE_FIX = (
    "Build it with `cloudtrain image build --region <region>` (the recipe in ami/, see "
    "ami/README.md), or set resources.image in the job to an AMI that has "
    "/opt/cloudtrain/envs/<backend>."
)
THEANO_MAX_PYTHON = (3, 8)  # theano 1.0.5 + keras 2.3.1 run on Python <= 3.8


class Status(str, Enum):
    """A finding's verdict; only FAIL makes ``doctor`` exit non-zero."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"  # not checked, because a check it depends on failed


@dataclass(frozen=True)
class Finding:
    """One check's result: a one-line explanation and, for a problem, how to fix it."""

    check: str  # a stable id: "credentials", "quota.g-spot", "sim-env.tensorflow" ...
    title: str  # what was checked, for people
    status: Status
    summary: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "title": self.title,
            "status": self.status.value,
            "summary": self.summary,
            "fix": self.fix,
            "data": self.data,
        }


@dataclass(frozen=True)
class Report:
    region: str
    simulated: bool
    findings: tuple[Finding, ...]

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if f.status is Status.FAIL]

    def counts(self) -> dict[str, int]:
        return {s.value: sum(1 for f in self.findings if f.status is s) for s in Status}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "simulated": self.simulated,
            "region": self.region,
            "ok": not self.failed,
            "counts": self.counts(),
            "findings": [f.to_json() for f in self.findings],
        }


# --- local checks (no AWS call) ----------------------------------------------------------


def check_keys(settings: Settings) -> Finding:
    """The private keys' folder must be 0700 and every key in it 0600 (as a launch refuses)."""
    folder = settings.keys_dir
    title = "private keys"
    if not folder.exists():
        return Finding(
            "keys", title, Status.OK, f"{folder} does not exist yet (the first run creates it 0700)"
        )
    if not folder.is_dir():
        return Finding(
            "keys",
            title,
            Status.FAIL,
            f"{folder} is not a folder",
            fix=f"Move it aside: mv {shlex.quote(str(folder))} {shlex.quote(str(folder))}.bak",
        )
    loose: list[tuple[Path, int, int]] = []  # path, mode, wanted
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    if folder_mode & 0o077:
        loose.append((folder, folder_mode, 0o700))
    keys = sorted(p for p in folder.iterdir() if p.suffix == ".pem" and p.is_file())
    for key in keys:
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & 0o077:
            loose.append((key, mode, 0o600))
    data = {
        "folder": str(folder),
        "keys": len(keys),
        "loose": [{"path": str(p), "mode": f"{m:o}", "wanted": f"{w:o}"} for p, m, w in loose],
    }
    if not loose:
        return Finding(
            "keys", title, Status.OK, f"{folder}: folder 700, {len(keys)} private key(s) all 600", data=data
        )
    named = ", ".join(f"{p.name} is {m:o}" for p, m, _ in loose[:3]) + (
        f" and {len(loose) - 3} more" if len(loose) > 3 else ""
    )
    commands = []
    for wanted in (0o700, 0o600):
        paths = [shlex.quote(str(p)) for p, _, w in loose if w == wanted]
        if paths:
            commands.append(f"chmod {wanted:o} {' '.join(paths)}")
    return Finding(
        "keys",
        title,
        Status.FAIL,
        f"others can read private keys in {folder} ({named}); a run refuses to use them",
        fix="Run: " + " && ".join(commands),
        data=data,
    )


def region_finding(region: str, source: str, catalog: Catalog) -> Finding:
    data = {"region": region, "source": source, "catalog_regions": list(catalog.regions)}
    if region in catalog.regions:
        return Finding("region", "region", Status.OK, f"{region} (from {source}), in the catalog", data=data)
    return Finding(
        "region",
        "region",
        Status.WARN,
        f"{region} (from {source}) is not in cloudtrain's price catalog: plans there find no offer",
        fix=f"Use one of {', '.join(catalog.regions)}: set AWS_DEFAULT_REGION, "
        "or resources.region in the job.",
        data=data,
    )


def _region(settings: Settings, override: str | None) -> tuple[str, str]:
    """The region a job without resources.region would use, and where it comes from."""
    if override:
        return override, "--region"
    if settings.region:
        return settings.region, "AWS_REGION / AWS_DEFAULT_REGION"
    if not settings.simulated:
        from cloudtrain.cloud.aws import profile_region

        try:
            found = profile_region(settings)
        except CloudtrainError:
            found = None  # the credentials check reports the broken profile
        if found:
            return found, f"profile {settings.profile or 'default'}'s config"
    return DEFAULT_REGION, "cloudtrain's default"


# --- AWS checks ---------------------------------------------------------------------------


def check_credentials(settings: Settings, cloud: AwsCloud) -> Finding:
    from cloudtrain.cloud.aws import credentials_source

    title = "AWS credentials"
    profile = settings.profile or "default"
    fix_none = (
        "Run `aws configure` (or `aws configure --profile NAME` and pass --profile NAME / set AWS_PROFILE); "
        "or try --dry-run."
    )
    try:
        source = credentials_source(settings)
    except CloudtrainError as e:
        return Finding("credentials", title, Status.FAIL, e.message, fix=e.hint or fix_none)
    if source is None:
        return Finding(
            "credentials",
            title,
            Status.FAIL,
            f"no AWS credentials found (profile {profile}, environment, config files)",
            fix=fix_none,
        )
    try:
        who = cloud.caller_identity()
    except CloudtrainError as e:
        return Finding(
            "credentials",
            title,
            Status.FAIL,
            f"credentials from {source}, but STS GetCallerIdentity failed: {e.message}",
            fix=e.hint or fix_none,
            data={"source": source},
        )
    where = "the simulated AWS" if settings.simulated else f"{source}, profile {profile}"
    return Finding(
        "credentials",
        title,
        Status.OK,
        f"account {who.account} as {who.arn} ({where})",
        data={"source": source, "account": who.account, "arn": who.arn},
    )


@dataclass(frozen=True)
class QuotaCheck:
    slug: str
    code: str
    family: str  # the instance family letter
    spot: bool
    required: bool  # a zero quota fails (the default job needs it) rather than warns

    @property
    def label(self) -> str:
        return f"{self.family.upper()} {'spot' if self.spot else 'on-demand'} vCPUs"


QUOTA_CHECKS = (
    QuotaCheck("g-spot", "L-3819A6DF", "g", spot=True, required=True),
    QuotaCheck("p-spot", "L-7212CCBC", "p", spot=True, required=False),
    QuotaCheck("g-on-demand", "L-DB2E81BA", "g", spot=False, required=False),
    QuotaCheck("p-on-demand", "L-417A185B", "p", spot=False, required=False),
)


def _smallest(catalog: Catalog, family: str, region: str) -> tuple[str, int] | None:
    types = [
        t
        for t in catalog.instance_types
        if t.family.startswith(family) and t.on_demand_price(region) is not None
    ]
    if not types:
        return None
    best = min(types, key=lambda t: (t.vcpus, t.name))
    return best.name, best.vcpus


def check_quotas(cloud: AwsCloud, catalog: Catalog) -> list[Finding]:
    """The GPU families' vCPU quotas; one 'could not check' warning if Service Quotas cannot answer."""
    from cloudtrain.cloud.aws import quota_name

    region = cloud.region
    findings: list[Finding] = []
    for check in QUOTA_CHECKS:
        name = quota_name(f"{check.family}x", check.spot)
        title = f"quota: {check.label}"
        try:
            quota = cloud.ec2_quota(check.code)
        except CloudtrainError as e:
            codes = ", ".join(f"{c.code} ({c.label})" for c in QUOTA_CHECKS)
            return [
                *findings,
                Finding(
                    "quotas",
                    "quotas: GPU vCPUs",
                    Status.WARN,
                    f"could not check the EC2 vCPU quotas in {region}: {e.message}",
                    fix=(
                        "None needed for dry-runs: the simulated AWS has no Service Quotas for EC2 "
                        "(on AWS, this check reads them)."
                        if cloud.settings.simulated
                        else "Grant servicequotas:GetServiceQuota to check them here, or look them up in "
                        f"the Service Quotas console (Amazon EC2, {region}): {codes}."
                    ),
                    data={"error": e.message, "codes": [c.code for c in QUOTA_CHECKS]},
                ),
            ]
        smallest = _smallest(catalog, check.family, region)
        need_type, need = smallest or ("", 1)
        data = {
            "code": quota.code,
            "name": quota.name or name,
            "value": quota.value,
            "applied": quota.applied,
            "smallest_type": need_type,
            "smallest_vcpus": need,
        }
        value = f"{quota.value:g} vCPUs" + ("" if quota.applied else " (AWS's default)")
        if quota.value >= need:
            summary = f"{value}: {name}" + (f"; the smallest, {need_type}, needs {need}" if need_type else "")
            findings.append(Finding(f"quota.{check.slug}", title, Status.OK, summary, data=data))
            continue
        why = (
            "the default job (the cheapest GPU, a G instance on spot) cannot launch"
            if check.required
            else f"jobs that need {check.family.upper()} instances"
            + (" on spot" if check.spot else " with spot: false")
            + " cannot launch"
        )
        findings.append(
            Finding(
                f"quota.{check.slug}",
                title,
                Status.FAIL if check.required else Status.WARN,
                f"{value}, below the {need} of {need_type or 'the smallest type'}: {why} ({name})",
                fix=f"Ask for at least {need}: aws service-quotas request-service-quota-increase --region "
                f"{region} --service-code ec2 --quota-code {check.code} --desired-value {need} "
                "(or in the Service Quotas console).",
                data=data,
            )
        )
    return findings


def check_plan_quota(cloud: AwsCloud, plan: Plan) -> Finding | None:
    """Whether the vCPU quota of the plan's choice holds all its nodes (nodes × the type's vCPUs);
    None for a type outside the G and P families (no quota checked here)."""
    from cloudtrain.cloud.aws import quota_name

    choice = plan.choice
    spot = choice.lifecycle is Lifecycle.SPOT
    check = next((c for c in QUOTA_CHECKS if c.family == choice.instance.name[:1] and c.spot == spot), None)
    if check is None:
        return None
    title = f"quota: {check.label} for {plan.job.name}"
    need = plan.nodes * choice.instance.vcpus
    each = f"{plan.nodes} nodes × {choice.instance.vcpus} vCPUs = " if plan.nodes > 1 else ""
    asked = f"{each}{need} vCPUs of {choice.instance.name}"
    try:
        quota = cloud.ec2_quota(check.code)
    except CloudtrainError as e:
        return Finding(
            "quota.job",
            title,
            Status.WARN,
            f"could not check the {check.label} quota for {asked}: {e.message}",
            data={"error": e.message, "code": check.code, "vcpus": need},
        )
    name = quota.name or quota_name(choice.instance.name, spot)
    data = {"code": check.code, "name": name, "value": quota.value, "nodes": plan.nodes, "vcpus": need}
    if need <= quota.value:
        summary = f"{asked}, within quota {quota.value:g} ({name})"
        return Finding("quota.job", title, Status.OK, summary, data=data)
    return Finding(
        "quota.job",
        title,
        Status.FAIL,
        f"{asked} > quota {quota.value:g} ({name}): the run cannot launch",
        fix=f"Ask for at least {need}: aws service-quotas request-service-quota-increase --region "
        f"{cloud.region} --service-code ec2 --quota-code {check.code} --desired-value {need} "
        "(or in the Service Quotas console).",
        data=data,
    )


def check_image(cloud: AwsCloud) -> Finding:
    from cloudtrain.cloud.aws import DEFAULT_IMAGE_PATTERN

    title = "cloudtrain image"
    try:
        image = cloud.resolve_image(None)
    except CloudtrainError as e:
        missing = e.message.startswith("no image")
        return Finding(
            "image",
            title,
            Status.FAIL,
            f"no cloudtrain image ({DEFAULT_IMAGE_PATTERN}, owned by this account) in {cloud.region}"
            if missing
            else f"could not look the image up: {e.message}",
            fix=BUILD_IMAGE_FIX if missing else e.hint,
            data={"pattern": DEFAULT_IMAGE_PATTERN},
        )
    return Finding(
        "image",
        title,
        Status.OK,
        f"{image.name} ({image.id}) in {cloud.region}",
        data={"id": image.id, "name": image.name, "pattern": DEFAULT_IMAGE_PATTERN},
    )


def check_leftovers(settings: Settings, cloud: AwsCloud) -> Finding:
    """Instances and key pairs still there for runs this home's ledger says have ended."""
    title = "leftovers of ended runs"
    try:
        ended = _ended_runs(settings)
        instances = cloud.tagged_instances()
        pairs = cloud.key_pair_names()
    except CloudtrainError as e:
        return Finding("leftovers", title, Status.WARN, f"could not look: {e.message}", fix=e.hint)
    stray = [i for i in instances if i.run_id in ended]
    stray_pairs = [p for p in pairs if p.removeprefix("cloudtrain-") in ended]
    data = {
        "instances": [{"id": i.id, "run_id": i.run_id, "state": i.state} for i in stray],
        "key_pairs": stray_pairs,
    }
    if not stray and not stray_pairs:
        return Finding(
            "leftovers",
            title,
            Status.OK,
            f"no instance or key pair of an ended run in {cloud.region}",
            data=data,
        )
    parts = []
    if stray:
        parts.append(
            f"{len(stray)} instance(s) not terminated: " + ", ".join(f"{i.id} ({i.run_id})" for i in stray)
        )
    if stray_pairs:
        parts.append(f"{len(stray_pairs)} key pair(s): {', '.join(stray_pairs)}")
    if settings.simulated:
        fix = "Run: cloudtrain sim stop (it removes every simulated instance)"
    else:
        commands = []
        if stray:
            ids = " ".join(i.id for i in stray)
            commands.append(f"aws ec2 terminate-instances --region {cloud.region} --instance-ids {ids}")
        commands += [f"aws ec2 delete-key-pair --region {cloud.region} --key-name {p}" for p in stray_pairs]
        fix = "Run: " + " && ".join(commands)
    return Finding(
        "leftovers",
        title,
        Status.WARN,
        f"for runs that ended, in {cloud.region}: " + "; ".join(parts),
        fix=fix,
        data=data,
    )


def _ended_runs(settings: Settings) -> set[str]:
    """The ids of this home's runs that ended and were not kept."""
    if not settings.ledger_path.exists():
        return set()
    from cloudtrain.ledger import Ledger

    with Ledger.open(settings) as ledger:
        return {r.id for r in ledger.list_runs() if r.state.finished and not r.handle.kept_until}


# --- the simulated image (dry-run) --------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_sim_image() -> list[Finding]:
    """The simulated image: built or not, and each job environment's Python (read from image.json)."""
    from cloudtrain.cloud import simimage

    title = "simulated image"
    try:
        path = simimage.image_path()
    except (OSError, subprocess.SubprocessError, CloudtrainError) as e:
        return [
            Finding(
                "sim-image",
                title,
                Status.FAIL,
                f"cannot tell which image the recipe builds: {e}",
                fix="Check CLOUDTRAIN_IMAGE_PYTHON: it must name a working Python.",
            )
        ]
    build = (
        "Run any job with --dry-run once, e.g. cloudtrain run jobs/digits-mlp/job.yaml --dry-run "
        "(needs access to PyPI)."
    )
    rebuild = f"Delete {shlex.quote(str(path))} and run a job with --dry-run to rebuild it."
    if not (path / "image.json").is_file():
        try:
            simimage.check_image_python()
        except CloudtrainError as e:
            image = Finding(
                "sim-image",
                title,
                Status.FAIL,
                f"cannot be built for tensorflow jobs: {e}",
                fix=e.hint or build,
                data={"path": str(path), "built": False},
            )
            return [image, *_python37_finding(simimage)]
        image = Finding(
            "sim-image",
            title,
            Status.WARN,
            f"not built yet ({path}): the first `run --dry-run` builds it from PyPI, in a few minutes",
            fix=build,
            data={"path": str(path), "built": False},
        )
        return [image, *_python37_finding(simimage)]
    try:
        described = simimage.describe(path)
    except (OSError, ValueError) as e:
        image = Finding("sim-image", title, Status.FAIL, f"{path}/image.json is unreadable: {e}", fix=rebuild)
        return [image, *_python37_finding(simimage)]
    envs = described.get("envs")
    envs = envs if isinstance(envs, dict) else {}
    names = sorted(str(name) for name in envs)
    complete = simimage.is_built(path)  # what a dry-run needs first (the tensorflow environment) is there
    data = {"path": str(path), "built": complete, "flavor": described.get("flavor"), "envs": names}
    where = f"at {path} ({described.get('flavor', '?')} flavor), environments: {', '.join(names) or 'none'}"
    if complete and names:
        image = Finding("sim-image", title, Status.OK, f"built {where}", data=data)
    else:
        image = Finding("sim-image", title, Status.WARN, f"partly built {where}", fix=build, data=data)
    return [
        image,
        *(_env_finding(name, envs[name], rebuild) for name in names),
        *_python37_finding(simimage),
    ]


def _env_finding(name: str, info: Any, rebuild: str) -> Finding:
    info = info if isinstance(info, dict) else {}
    python = str(info.get("python") or "")
    recorded = str(info.get("python_version") or "")
    check, title = f"sim-env.{name}", f"environment {name}"
    data = {"python": python, "python_version": recorded}
    if not python or not Path(python).exists():
        return Finding(
            check,
            title,
            Status.FAIL,
            f"its Python {python or '(not recorded)'} is missing",
            fix=rebuild,
            data=data,
        )
    try:
        from cloudtrain.cloud.simimage import python_version

        actual = python_version(python)
    except (OSError, subprocess.SubprocessError) as e:
        return Finding(
            check, title, Status.FAIL, f"its Python {python} does not run: {e}", fix=rebuild, data=data
        )
    data["python_version"] = actual
    if name == "theano" and _version_tuple(actual) > THEANO_MAX_PYTHON:
        return Finding(
            check,
            title,
            Status.FAIL,
            f"Python {actual} ({python}): the Theano stack needs Python <= 3.8",
            fix=rebuild,
            data=data,
        )
    if recorded and recorded != actual:
        return Finding(
            check,
            title,
            Status.WARN,
            f"Python {actual} ({python}), but image.json says {recorded}",
            fix=rebuild,
            data=data,
        )
    return Finding(check, title, Status.OK, f"Python {actual} ({python})", data=data)


def _python37_finding(simimage: Any) -> list[Finding]:
    """Whether a Python 3.7 (for the theano environment) is found, where the image module can look."""
    finder: Callable[[], Any] | None = getattr(simimage, "find_python37", None)
    if not callable(finder):
        return []
    title = "Python 3.7 (theano)"
    fix = str(
        getattr(simimage, "INSTALL_PYTHON37", None)
        or "Install one (`pyenv install 3.7.16`) or set CLOUDTRAIN_PYTHON37 to a Python 3.7."
    )
    try:
        found = finder()
    except (OSError, subprocess.SubprocessError, CloudtrainError) as e:
        return [Finding("python3.7", title, Status.WARN, f"looking for Python 3.7 failed: {e}", fix=fix)]
    if not found:
        return [
            Finding(
                "python3.7",
                title,
                Status.WARN,
                "no Python 3.7 found: the theano environment cannot be built, so no theano dry-run",
                fix=fix,
            )
        ]
    return [
        Finding(
            "python3.7",
            title,
            Status.OK,
            f"found {found}: the theano environment can be built from it",
            data={"python": str(found)},
        )
    ]


# --- all of it ------------------------------------------------------------------------------


def _skipped(checks: list[tuple[str, str]], reason: str) -> Iterator[Finding]:
    for check, title in checks:
        yield Finding(check, title, Status.SKIP, f"not checked: {reason}")


AWS_CHECKS = [
    ("quotas", "quotas: GPU vCPUs"),
    ("image", "cloudtrain image"),
    ("leftovers", "leftovers of ended runs"),
]


def diagnose(
    settings: Settings,
    *,
    dry_run: bool = False,
    region: str | None = None,
    cloud_factory: Callable[[Settings, str], AwsCloud] | None = None,
) -> Report:
    """Run every check; return the findings in order. Raises nothing a check can report.

    ``dry_run``: start (or reuse) this home's simulator, as ``plan --dry-run`` does, and
    check the simulated AWS and the simulated image. ``region``: check that region instead
    of the one a job without resources.region would use. ``cloud_factory`` makes the
    cloud the AWS checks go through (tests hand in one with a stubbed client).
    """
    catalog = load_catalog()
    findings: list[Finding] = []
    active = settings
    reachable = True
    if dry_run:
        simulator = _check_simulator(settings)
        findings.append(simulator)
        reachable = simulator.status is Status.OK
        if reachable:
            active = _simulated(settings)
    where, source = _region(active, region)
    cloud: AwsCloud | None = None
    if reachable:
        cloud = (cloud_factory or _default_cloud)(active, where)
        credentials = check_credentials(active, cloud)
        reason = "the credentials check failed"
    else:
        credentials = next(_skipped([("credentials", "AWS credentials")], "the simulator did not start"))
        reason = "the simulator did not start"
    findings.append(credentials)
    findings.append(region_finding(where, source, catalog))
    findings.append(check_keys(settings))
    if cloud is not None and credentials.status is Status.OK:
        findings += check_quotas(cloud, catalog)
        findings.append(check_image(cloud))
        findings.append(check_leftovers(active, cloud))
    else:
        findings += _skipped(AWS_CHECKS, reason)
    if dry_run:
        findings += check_sim_image()
    return Report(region=where, simulated=active.simulated, findings=tuple(findings))


def _default_cloud(settings: Settings, region: str) -> AwsCloud:
    from cloudtrain.cloud.aws import AwsCloud

    return AwsCloud(settings, region, max_attempts=MAX_ATTEMPTS)


def _check_simulator(settings: Settings) -> Finding:
    """Start (or reuse) this home's simulator, as every --dry-run command does."""
    from cloudtrain.cloud.simulator import ensure_simulator, simulator_status

    try:
        endpoint = ensure_simulator(settings).endpoint_url
    except CloudtrainError as e:
        return Finding("simulator", "simulator", Status.FAIL, e.message, fix=e.hint)
    state = simulator_status(settings) or {}
    return Finding(
        "simulator",
        "simulator",
        Status.OK,
        f"running (pid {state.get('pid')}, since {state.get('started_at')}), simulated AWS at {endpoint}",
        data={"pid": state.get("pid"), "endpoint": endpoint, "started_at": state.get("started_at")},
    )


def _simulated(settings: Settings) -> Settings:
    from cloudtrain.cloud.simulator import ensure_simulator

    return ensure_simulator(settings)  # already running: returns its settings at once
