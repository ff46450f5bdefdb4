"""The job file: load ``job.yaml``, validate it, and return a frozen ``JobSpec``.

Every problem becomes a ``SpecError`` naming the file, the line, the key path, what
was expected and, for a misspelt key, the key that was probably meant. Nothing here
touches AWS: the whole spec is checked before the first call.
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cloudtrain.catalog import Catalog, load_catalog
from cloudtrain.errors import SpecError

INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
BOOL_TAG, MERGE_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:merge"


MAX_JOB_BYTES = 1024 * 1024  # a job file names its data; it does not hold it
MAX_VALUES = 100_000  # values in a job file once its aliases are expanded
MAX_DEPTH = 64  # levels of nesting
MAX_DIGITS = 64  # digits of a whole number


class _Unbounded(Exception):
    """A job file whose work would not be bounded by its size (alias bombs, loops, deep nesting)."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = mark.line + 1 if mark is not None else 1


class _JobLoader(yaml.SafeLoader):
    """PyYAML's YAML 1.1, plus YAML 1.2's exponent floats: ``1e-3`` is a number, not text.

    Composing is bounded by the text: aliases may not expand the document beyond
    MAX_VALUES values nor refer to a value that contains them, and nesting stops at MAX_DEPTH.
    A date is text (no job key is a date).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # values composed so far, each alias counted as what it expands to
        self._sizes: dict[int, int] = {}  # id(node) -> its values once expanded
        self._open: list[str | None] = []  # anchors of the nodes being composed, outermost first

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Unbounded(
                    f"the alias *{event.anchor} refers to the value that holds it (a loop)",
                    event.start_mark,
                )
            target = self.anchors.get(event.anchor)  # unknown: PyYAML's own error
            self._count(self._sizes.get(id(target), 1), event, f"the alias *{event.anchor}")
            return super().compose_node(parent, index)
        if len(self._open) >= MAX_DEPTH:
            raise _Unbounded(f"values nested more than {MAX_DEPTH} levels deep", event.start_mark)
        self._count(1, event, "this value")
        self._open.append(getattr(event, "anchor", None))
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open.pop()
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        self._sizes[id(node)] = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        return node

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # Refused while scanning: the scanner's own work grows with the nesting of [ and {.
        if self.flow_level >= MAX_DEPTH:
            raise _Unbounded(f"values nested more than {MAX_DEPTH} levels deep", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def _count(self, values: int, event: yaml.Event, what: str) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise _Unbounded(
                f"{what} takes the job file past {MAX_VALUES:,} values; write the values out "
                "instead of nesting aliases",
                event.start_mark,
            )


_JobLoader.add_implicit_resolver(
    FLOAT_TAG, re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _date_as_text(loader: _JobLoader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


_JobLoader.add_constructor("tag:yaml.org,2002:timestamp", _date_as_text)


def _construct(node: yaml.Node) -> Any:
    """The Python value of a composed YAML node (safe types only)."""
    loader = _JobLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


NAME_RE = r"^[a-z0-9][a-z0-9-]{0,39}$"
REGION_RE = r"^[a-z]{2}(-gov)?-[a-z]+-\d$"
ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
AMI_ID_RE = re.compile(r"^ami-[0-9a-f]{8,17}$")
MAX_NODES = 16
# Keras 3's fit fails under MultiWorkerMirroredStrategy upstream; tf-keras (keras: 2) trains.
KERAS3_MULTIWORKER_BUG = "keras-team/keras#20585"


def _relative_path(value: str) -> str:
    """A path that must stay inside the workdir: relative, no ``..``."""
    path = PurePosixPath(value)
    if not value or value.strip() in ("", "."):
        raise ValueError("must name a path inside the workdir, not the workdir itself")
    if path.is_absolute() or re.match(r"^[A-Za-z]:[\\/]", value):
        raise ValueError(f"'{value}' is absolute; give a path relative to the workdir")
    if ".." in path.parts:
        raise ValueError(f"'{value}' escapes the workdir with '..'")
    return value


def _env_value(value: Any) -> Any:
    """YAML gives ints, floats and bools for unquoted values; the environment wants text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


class _Strict(BaseModel):
    # strict: a YAML value of the wrong type is refused, never coerced ("yes" is no bool, true no
    # disk size); finite numbers only (.inf hours would plan an infinite cost).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


S3_URL_RE = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"


def _s3_url(value: str) -> str:
    if not re.match(S3_URL_RE, value):
        raise ValueError(f"'{value}' is not an S3 URL like s3://bucket/prefix/")
    return value


AWS_CREDENTIAL_NAMES = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"}
)


def _check_names(names: Iterable[str]) -> None:
    """Environment variable names; never AWS credentials (the instance uses its own role),
    never cloudtrain's own (CLOUDTRAIN_*: it sets them for the run)."""
    for key in names:
        if not re.match(ENV_NAME_RE, key):
            raise ValueError(f"'{key}' is not a valid environment variable name")
        if key.startswith("CLOUDTRAIN_"):
            raise ValueError(f"'{key}': CLOUDTRAIN_* variables are cloudtrain's own, set for the run")
        if key in AWS_CREDENTIAL_NAMES:
            raise ValueError(
                f"'{key}': AWS credentials never go to the instance; S3 data and checkpoints use the "
                "run's own instance profile"
            )


class DataSource(_Strict):
    """An extra input: a local path synced to the instance, or an S3 prefix fetched there."""

    src: str = Field(min_length=1, description="Local path (relative to the job file) or s3://bucket/prefix")
    dst: str = Field(min_length=1, description="Destination, relative to the workdir on the instance")

    @field_validator("dst")
    @classmethod
    def _dst_inside(cls, value: str) -> str:
        return _relative_path(value)

    @field_validator("src")
    @classmethod
    def _src_form(cls, value: str) -> str:
        return _s3_url(value) if value.startswith("s3://") else value

    @property
    def is_s3(self) -> bool:
        return self.src.startswith("s3://")


class Resources(_Strict):
    """What to rent: a GPU (model[:count]) or an instance type, spot or on-demand, where."""

    gpu: str | None = Field(None, description='GPU model and count: "T4", "A10G:1", "V100:4"')
    instance_type: str | None = Field(None, description="An exact EC2 instance type (exclusive with gpu)")
    spot: bool = Field(True, description="Rent a spot instance (false: on-demand)")
    max_price: float | None = Field(None, gt=0, description="Highest acceptable USD per hour")
    region: str | None = Field(
        None, pattern=REGION_RE, description="AWS region; default the profile's, else us-east-1"
    )
    zones: list[str] | None = Field(None, min_length=1, description="Allowed availability zones")
    disk_gb: int = Field(100, gt=0, le=16384, description="Root EBS volume size (GiB), encrypted")
    image: str | None = Field(
        None,
        min_length=1,
        description="AMI id or name; default the newest cloudtrain image of the installed recipe; "
        "base: the base image, the job environment installed at boot (slower)",
    )
    fallback: Literal["none", "on-demand"] = Field(
        "none",
        description="When no spot offer has capacity: none (fail), or on-demand (cheapest type, on-demand)",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="Instances of the chosen type training together, in one zone "
        "(tf.distribute.MultiWorkerMirroredStrategy; needs backend: tensorflow with keras: 2)",
    )

    @model_validator(mode="after")
    def _exclusive(self) -> Resources:
        if self.gpu is not None and self.instance_type is not None:
            raise ValueError("give either gpu or instance_type, not both")
        if self.region and self.zones:
            for zone in self.zones:
                if not (zone.startswith(self.region) and len(zone) == len(self.region) + 1):
                    raise ValueError(f"zone '{zone}' is not in region {self.region}")
        return self

    @property
    def gpu_model(self) -> str | None:
        return None if self.gpu is None else self.gpu.split(":", 1)[0]

    @property
    def gpu_count(self) -> int | None:
        if self.gpu is None:
            return None
        _, _, count = self.gpu.partition(":")
        return int(count) if count else 1


class Checkpoint(_Strict):
    """Checkpoints that survive spot interruptions (weights, optimizer state, epoch)."""

    every_epochs: int = Field(1, ge=1, description="Checkpoint every N epochs (and at once on a notice)")
    s3: Annotated[str, AfterValidator(_s3_url)] | None = Field(
        None,
        description="Also keep the checkpoint in S3 (s3://bucket/prefix/; each run under "
        "<prefix>/<run-id>/), written by the instance's own role",
    )

    def s3_url(self, run_id: str) -> str | None:
        """The run's own checkpoint URL under ``s3``."""
        return None if self.s3 is None else f"{self.s3.rstrip('/')}/{run_id}/"


class Watchdog(_Strict):
    """The instance's own guard: it powers itself off when nobody collects a finished run."""

    collect_grace_s: int = Field(
        1800,
        ge=1,
        description="Seconds an ended run waits for a controller to collect its outputs before the "
        "instance powers itself off (outputs go to checkpoint.s3's prefix first, when set)",
    )


class Budget(_Strict):
    """Per-run limits, across relaunches."""

    max_hours: float | None = Field(None, gt=0, description="Wall-clock hours before the run is stopped")
    max_cost_usd: float | None = Field(None, gt=0, description="USD before the run is stopped")
    max_idle_minutes: float = Field(
        30.0,
        gt=0,
        description="Minutes without progress (a step of fit, evaluate or predict, or any log output) "
        "before the stall guard acts",
    )
    on_idle: Literal["stop", "warn"] = Field(
        "stop",
        description="stop: a run idle inside fit/evaluate/predict is stopped as a budget stop (exit 4, "
        "checkpoint and outputs pulled back); warn: only say so. Idle outside them only warns",
    )


class JobSpec(_Strict):
    """A validated job file. Paths are absolute once loaded through ``load_job``."""

    name: str = Field(pattern=NAME_RE, description="Run name: lower-case letters, digits, '-'")
    backend: Literal["tensorflow", "theano"] = Field("tensorflow", description="Keras backend")
    keras: Literal[2, 3] | None = Field(
        None,
        description="Keras API: 3 (default on tensorflow), or 2 (tf-keras on tensorflow; "
        "theano is always Keras 2.3.1)",
    )
    workdir: str = Field(".", description="Folder synced to the instance; default the job file's folder")
    setup: str | None = Field(None, min_length=1, description="Shell run once per instance before `run`")
    run: str = Field(min_length=1, description="Shell command that trains")
    outputs: list[Annotated[str, AfterValidator(_relative_path)]] = Field(
        default_factory=list, description="Paths under workdir pulled back after the run"
    )
    data: list[DataSource] = Field(default_factory=list, description="Extra inputs")
    env: dict[str, Annotated[str, BeforeValidator(_env_value)]] = Field(
        default_factory=dict, description="Environment variables for setup and run"
    )
    seed: int | None = Field(None, ge=0, description="Random seed applied to the run")
    resources: Resources = Field(default_factory=Resources)  # type: ignore[arg-type]
    budget: Budget = Field(default_factory=Budget)  # type: ignore[arg-type]
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)  # type: ignore[arg-type]
    watchdog: Watchdog = Field(default_factory=Watchdog)  # type: ignore[arg-type]
    secrets: list[str] = Field(
        default_factory=list,
        description="Names of local environment variables passed to the run, never written anywhere",
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        _check_names(value)
        return value

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        _check_names(value)
        return value

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)


def json_schema() -> dict[str, Any]:
    """The job file's JSON Schema, for editor completion (``cloudtrain schema``)."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cloudtrain job"
    return schema


# --- loading -----------------------------------------------------------------------------


class _Positions:
    """Line numbers (1-based) of every key path in a YAML document."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        self.problems: list[str] = []  # "LINE: key.path: what" for what YAML reads unlike its looks
        self._seen: set[int] = set()  # nodes walked: an alias's value is walked once, where defined
        if root is not None:
            self._walk(root, ())

    def _walk(self, node: yaml.Node, path: tuple[str | int, ...]) -> None:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if id(node) in self._seen:
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                key_line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode):
                    self._check_scalar(key, sub, key_line)
                if sub in self.lines and key.tag != MERGE_TAG:  # YAML keeps the later one silently
                    self.problems.append(
                        f"{key_line}: {_dotted(sub)}: appears twice (first on line {self.lines[sub]}); "
                        "the later one would silently win"
                    )
                    continue
                self.lines[sub] = key_line
                self._walk(value, sub)
        elif isinstance(node, yaml.ScalarNode):
            if self._check_scalar(node, path, line):
                pass
            elif node.tag in (INT_TAG, FLOAT_TAG) and ":" in node.value and path[:1] != ("env",):
                number = _construct(node)
                self.problems.append(
                    f"{line}: {_dotted(path)}: YAML reads {node.value} as base 60, {number}; "
                    "write the number you mean"
                )
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, (*path, index))

    def _check_scalar(self, node: yaml.ScalarNode, path: tuple[str | int, ...], line: int) -> bool:
        """A key's or value's text that no job can use; True when a problem was noted."""
        digits = sum(c.isdigit() for c in node.value) if node.tag == INT_TAG else 0
        if "\0" in str(node.value):  # no path, command line or variable can carry one
            self.problems.append(f"{line}: {_dotted(path)}: contains a NUL character (\\0)")
        elif digits > MAX_DIGITS:  # (Python refuses to read one of over 4,300)
            self.problems.append(f"{line}: {_dotted(path)}: a whole number of {digits} digits")
        else:
            return False
        return True

    def line(self, path: tuple[str | int, ...]) -> int:
        """The line of the longest known prefix of ``path``."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and len(part) > 40:  # a key is named, not reprinted
            part = part[:37] + "..."
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``loc`` (for did-you-mean)."""
    model: type[BaseModel] = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def _describe(error: Mapping[str, Any]) -> tuple[tuple[str | int, ...], str]:
    loc: tuple[str | int, ...] = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        owner = _model_at(loc[:-1])
        known = sorted(owner.model_fields) if owner else []
        guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        text = f"unknown key '{key}'"
        text += f" (did you mean '{guess[0]}'?)" if guess else f"; expected one of: {', '.join(known)}"
        return loc, text
    if kind == "missing":
        return loc, "is required"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "name":
        return (
            loc,
            f"'{error['input']}' must be 1-40 lower-case letters, digits or '-', "
            "starting with a letter or digit",
        )
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "region":
        return loc, f"'{error['input']}' is not an AWS region name like us-east-1"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if kind.endswith("_type") or kind in (
        "literal_error",
        "greater_than",
        "greater_than_equal",
        "less_than_equal",
        "too_short",
    ):
        message = f"{message} (got {_short_repr(error.get('input'))})"
    # A model-level validator reports at the model's own location.
    return loc, message


def _short_repr(value: Any, limit: int = 60) -> str:
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem(path: Path, positions: _Positions, loc: tuple[str | int, ...], message: str) -> str:
    return f"{path}:{positions.line(loc)}: {_dotted(loc)}: {message}"


def _raise(path: Path, problems: list[str]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise SpecError(problems[0], hint="Fix the key and run again; `cloudtrain schema` lists every key.")
    listing = "\n".join(f"  {p}" for p in problems)
    raise SpecError(
        f"{path}: {len(problems)} problems in the job file:\n{listing}",
        hint="Fix the keys above and run again; `cloudtrain schema` lists every key.",
    )


def _iter_semantic_problems(
    spec: JobSpec, base: Path, catalog: Catalog
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    workdir = (base / spec.workdir).resolve()
    if not workdir.is_dir():
        yield ("workdir",), f"folder '{workdir}' does not exist"
    for index, source in enumerate(spec.data):
        if not source.is_s3 and not (base / source.src).exists():
            yield ("data", index, "src"), f"'{(base / source.src).resolve()}' does not exist"
    if spec.backend == "theano" and spec.keras == 3:
        yield ("keras",), "Keras 3 has no Theano backend: use keras: 2 (Keras 2.3.1), or backend: tensorflow"
    res = spec.resources
    if res.nodes > 1 and spec.backend == "theano":
        yield (
            ("resources", "nodes"),
            f"{res.nodes} nodes need tf.distribute, which backend: theano does not have: use "
            "backend: tensorflow with keras: 2, or nodes: 1",
        )
    elif res.nodes > 1 and spec.keras != 2:
        keras3 = "keras: 3" if spec.keras == 3 else "keras: 3 (the default on tensorflow)"
        yield (
            ("resources", "nodes"),
            f"{res.nodes} nodes need keras: 2 (tf-keras): under {keras3}, fit fails with "
            f"MultiWorkerMirroredStrategy ({KERAS3_MULTIWORKER_BUG}); set keras: 2, or nodes: 1",
        )
    if res.gpu is not None:
        model, _, count = res.gpu.partition(":")
        if count and not re.fullmatch(r"[1-9][0-9]{0,3}", count):
            yield (
                ("resources", "gpu"),
                f"'{res.gpu}': the count after ':' must be a positive whole number",
            )
        canonical = catalog.canonical_gpu(model)
        if canonical is None:
            guess = difflib.get_close_matches(model.upper(), catalog.gpu_names(), n=1, cutoff=0.5)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            yield (
                ("resources", "gpu"),
                (f"unknown GPU '{model}'{hint}; expected one of: {', '.join(catalog.gpu_names())}"),
            )
    if res.instance_type is not None and catalog.get(res.instance_type) is None:
        names = [t.name for t in catalog.instance_types]
        guess = difflib.get_close_matches(res.instance_type, names, n=1, cutoff=0.6)
        hint = f" (did you mean '{guess[0]}'?)" if guess else "; `cloudtrain plan --list-types` lists them"
        yield (
            ("resources", "instance_type"),
            (f"'{res.instance_type}' is not a GPU instance type cloudtrain knows{hint}"),
        )
    if res.image is not None and res.image.startswith("ami-") and not AMI_ID_RE.match(res.image):
        yield (
            ("resources", "image"),
            f"'{res.image}' is not an AMI id (ami- followed by 8 or 17 hex digits)",
        )


def load_job(path: str | os.PathLike[str], catalog: Catalog | None = None) -> JobSpec:
    """Read, validate and resolve a job file; raise ``SpecError`` on any problem."""
    job_path = Path(path)
    try:
        text = job_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{job_path}: no such job file", hint="Check the path; jobs/ has examples.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{job_path}: cannot read the job file: {e}") from e
    if len(text) > MAX_JOB_BYTES:
        raise SpecError(
            f"{job_path}: the job file is {len(text.encode()) / 2**20:.1f} MiB; a job file is at most "
            f"{MAX_JOB_BYTES // 2**20} MiB",
            hint="Name the training's data under data: (local paths or s3://) instead of writing it in.",
        )
    try:
        root = yaml.compose(text, Loader=_JobLoader)
        positions = _Positions(root)  # line numbers as written: constructing flattens merge keys
        _raise(job_path, [f"{job_path}:{problem}" for problem in positions.problems])
        document = None if root is None else _construct(root)
    except _Unbounded as e:
        raise SpecError(
            f"{job_path}:{e.line}: {e.problem}", hint="A job file is small: write it out."
        ) from None
    except (ValueError, RecursionError) as e:  # a value PyYAML cannot turn into Python
        raise SpecError(f"{job_path}: a value cannot be read: {e}", hint="Check the values' types.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{job_path}:{mark.line + 1}" if mark is not None else str(job_path)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{where}: not valid YAML: {problem}", hint="Check indentation and quoting.") from e
    if document is None:
        raise SpecError(f"{job_path}: the job file is empty", hint="Start from an example in jobs/.")
    if not isinstance(document, dict):
        raise SpecError(
            f"{job_path}:1: the job file must be a mapping of keys (name:, run:, ...), "
            f"not a {type(document).__name__}",
            hint="Start from an example in jobs/.",
        )
    _env_as_written(root, document)
    try:
        spec = JobSpec.model_validate(document)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            loc, message = _describe(error)
            problems.append(_problem(job_path, positions, loc, message))
        _raise(job_path, problems)
        raise AssertionError("unreachable") from e
    base = job_path.resolve().parent
    catalog = catalog or load_catalog()
    _raise(
        job_path,
        [
            _problem(job_path, positions, loc, msg)
            for loc, msg in _iter_semantic_problems(spec, base, catalog)
        ],
    )
    return _resolved(spec, base, catalog)


def _env_as_written(root: yaml.Node | None, document: dict[str, Any]) -> None:
    """``env:`` values as typed: YAML reads ``3.10`` as 3.1, ``010`` as 8 and ``yes`` as True."""
    env = document.get("env")
    if not isinstance(root, yaml.MappingNode) or not isinstance(env, dict):
        return
    for key, value in root.value:
        if key.value == "env" and isinstance(value, yaml.MappingNode):
            written: dict[str, yaml.Node] = {}  # the pair that counts for each name: the last
            for name, text in value.value:  # (constructing put merged pairs before explicit ones)
                written[str(name.value)] = text
            for name, text in written.items():
                plain = isinstance(text, yaml.ScalarNode) and text.tag in (INT_TAG, FLOAT_TAG, BOOL_TAG)
                if plain and name in env:
                    env[name] = text.value


def _resolved(spec: JobSpec, base: Path, catalog: Catalog) -> JobSpec:
    """Absolute workdir and local data paths, canonical GPU spelling, the Keras API settled."""
    data = [
        src if src.is_s3 else src.model_copy(update={"src": str((base / src.src).resolve())})
        for src in spec.data
    ]
    resources = spec.resources
    if resources.gpu is not None:
        model, sep, count = resources.gpu.partition(":")
        resources = resources.model_copy(update={"gpu": f"{catalog.canonical_gpu(model)}{sep}{count}"})
    return spec.model_copy(
        update={
            "keras": spec.keras or (2 if spec.backend == "theano" else 3),
            "workdir": str((base / spec.workdir).resolve()),
            "data": data,
            "resources": resources,
        }
    )
