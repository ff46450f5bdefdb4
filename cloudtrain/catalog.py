"""The dated GPU instance catalog: what each instance type has, and its on-demand price.

A leaf module (stdlib and ``cloudtrain.errors`` only). The catalog is data shipped in
the package, ``cloudtrain/data/catalog.json``: the GPU instance types cloudtrain may
rent (family, GPU model and count, GPU memory per GPU, vCPUs, memory) and their
on-demand Linux list prices per region in USD per hour, plus the EBS gp3 price per
GB-month, and (from the image recipe, ``ami/theano-gpus.json``) the GPUs the Theano
image can drive. The file says when its prices were taken (``generated``) and where from
(``source``); ``python -m cloudtrain.cloud.catalog_update`` regenerates it from the
AWS Pricing API or AWS's public price-list files.

Spot prices are fetched live when there are credentials. The catalog may also hold
observed ones, filled only by the updater: per type and zone, the median of
``DescribeSpotPriceHistory`` over ``spot_observed`` (a window of days); a plan made
without credentials shows them as such (``catalog 2025-05-01``), or, where the catalog
has none, an estimate labelled as one (prices.py). Hand-made numbers are never shown
as observed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any, NoReturn

from cloudtrain.errors import CloudtrainError

SCHEMA = 1
CATALOG_RESOURCE = "data/catalog.json"
THEANO_GPUS_RESOURCE = "theano-gpus.json"  # in the image recipe, ami/ (package cloudtrain.ami)
FALLBACK_REGION = "us-east-1"

_HINT = (
    "The instance catalog is damaged. Regenerate it with "
    "`python -m cloudtrain.cloud.catalog_update --out cloudtrain/data/catalog.json`, "
    "or reinstall cloudtrain."
)


@dataclass(frozen=True)
class InstanceType:
    """One GPU instance type. ``gpu_memory_gib`` is per GPU; prices are USD per hour."""

    name: str
    family: str
    gpu: str
    gpu_count: int
    gpu_memory_gib: float
    vcpus: int
    memory_gib: float
    on_demand: Mapping[str, float] = field(default_factory=dict, hash=False)
    # zone -> the median spot price observed there over the catalog's spot_observed window
    spot: Mapping[str, float] = field(default_factory=dict, hash=False)

    def on_demand_price(self, region: str) -> float | None:
        """The on-demand Linux price in ``region``, or None where the type is not offered."""
        return self.on_demand.get(region)

    def observed_spot(self, region: str) -> dict[str, float]:
        """zone -> the catalog's observed spot price, for the zones of ``region``."""
        return {zone: price for zone, price in self.spot.items() if zone_region(zone) == region}

    @property
    def total_gpu_memory_gib(self) -> float:
        return self.gpu_memory_gib * self.gpu_count


@dataclass(frozen=True)
class Catalog:
    """The whole catalog, as of ``generated``."""

    generated: date
    source: str
    regions: tuple[str, ...]
    instance_types: tuple[InstanceType, ...]
    ebs_gp3_per_gb_month: Mapping[str, float] = field(default_factory=dict, hash=False)
    # The GPUs the Theano image can drive (ami/theano-gpus.json); None: no restriction.
    theano_gpus: tuple[str, ...] | None = None
    theano_cuda: str | None = None
    # the days the observed spot prices span (first, last); None: the catalog has none
    spot_observed: tuple[date, date] | None = None
    # small x86_64 types without a GPU, never planned for a job: `doctor --launch`'s
    cpu_instance_types: tuple[InstanceType, ...] = ()

    def cpu_type(self, name: str) -> InstanceType | None:
        """A type of ``cpu_instance_types`` (``t3.micro``), or None."""
        return next((t for t in self.cpu_instance_types if t.name == name), None)

    def get(self, name: str) -> InstanceType | None:
        """The instance type called ``name`` (exact, e.g. ``g4dn.xlarge``), or None."""
        for itype in self.instance_types:
            if itype.name == name:
                return itype
        return None

    def gpu_names(self) -> tuple[str, ...]:
        """The GPU models in the catalog, sorted and unique: ``("A100", "A10G", ...)``."""
        return tuple(sorted({itype.gpu for itype in self.instance_types}))

    def canonical_gpu(self, name: str) -> str | None:
        """The catalog's spelling of a GPU model, matched case-insensitively, or None.

        ``"t4"`` -> ``"T4"``; a leading ``"NVIDIA "`` is ignored (``"nvidia a10g"`` ->
        ``"A10G"``).
        """
        wanted = name.strip().casefold()
        if wanted.startswith("nvidia "):
            wanted = wanted[len("nvidia ") :].strip()
        for gpu in self.gpu_names():
            if gpu.casefold() == wanted:
                return gpu
        return None

    def ebs_price(self, region: str) -> float:
        """EBS gp3 USD per GB-month in ``region``; us-east-1's price for an unknown region.

        If the catalog has no us-east-1 price either, the highest known price is used,
        so that an estimate errs on the expensive side.
        """
        prices = self.ebs_gp3_per_gb_month
        if region in prices:
            return prices[region]
        if FALLBACK_REGION in prices:
            return prices[FALLBACK_REGION]
        return max(prices.values())


@lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    """The catalog shipped in the package (parsed once, then cached)."""
    resource = resources.files("cloudtrain").joinpath(CATALOG_RESOURCE)
    try:
        text = resource.read_text(encoding="utf-8")
    except OSError as e:
        raise CloudtrainError(f"cannot read the instance catalog {CATALOG_RESOURCE}: {e}", _HINT) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CloudtrainError(f"the instance catalog {CATALOG_RESOURCE} is not valid JSON: {e}", _HINT) from e
    if not isinstance(data, Mapping):
        raise CloudtrainError(f"the instance catalog {CATALOG_RESOURCE} is not a JSON object", _HINT)
    cuda, gpus = load_theano_gpus()
    return replace(parse_catalog(data), theano_gpus=gpus, theano_cuda=cuda)


def load_theano_gpus() -> tuple[str, tuple[str, ...]]:
    """(CUDA version, GPU models) of ami/theano-gpus.json: what the Theano image can drive.

    The same file the image recipe (ami/theano-gpu.sh) checks the build machine's GPU against."""
    where = f"the image recipe's {THEANO_GPUS_RESOURCE}"
    try:
        data = json.loads(resources.files("cloudtrain.ami").joinpath(THEANO_GPUS_RESOURCE).read_text())
        cuda = data["cuda"]
        gpus = tuple(sorted({gpu for models in data["architectures"].values() for gpu in models}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CloudtrainError(f"cannot read {where}: {e}", "Reinstall cloudtrain.") from e
    if not isinstance(cuda, str) or not gpus or not all(isinstance(g, str) for g in gpus):
        raise CloudtrainError(f"{where}: 'cuda' and 'architectures' are malformed", "Reinstall cloudtrain.")
    return cuda, gpus


def parse_catalog(data: Mapping[str, Any]) -> Catalog:
    """Validate catalog data (the JSON schema of ``catalog.json``) and build a Catalog.

    Raises ``CloudtrainError`` whose message names the bad entry and field.
    """
    schema = data.get("schema")
    if schema != SCHEMA:
        _fail(f"catalog: unsupported schema {schema!r} (this cloudtrain reads schema {SCHEMA})")
    generated = _iso_date(data.get("generated"), "catalog: 'generated'")
    source = data.get("source")
    if not isinstance(source, str) or not source.strip():
        _fail("catalog: 'source' must be a non-empty string")
    currency = data.get("currency", "USD")
    if currency != "USD":
        _fail(f"catalog: 'currency' must be 'USD', got {currency!r}")

    raw_regions = data.get("regions")
    if (
        not isinstance(raw_regions, list)
        or not raw_regions
        or not all(isinstance(r, str) and r for r in raw_regions)
    ):
        _fail("catalog: 'regions' must be a non-empty list of region names")
    regions = tuple(raw_regions)
    if len(set(regions)) != len(regions):
        _fail(f"catalog: 'regions' lists a region twice: {list(regions)}")

    ebs = _price_map(data.get("ebs_gp3_per_gb_month"), "catalog: 'ebs_gp3_per_gb_month'", regions)
    if not ebs:
        _fail("catalog: 'ebs_gp3_per_gb_month' must price at least one region")

    spot_observed = None
    if data.get("spot_observed") is not None:
        window = data["spot_observed"]
        if not isinstance(window, Mapping):
            _fail("catalog: 'spot_observed' must be an object with 'from' and 'to' dates")
        first = _iso_date(window.get("from"), "catalog: 'spot_observed.from'")
        last = _iso_date(window.get("to"), "catalog: 'spot_observed.to'")
        if last < first:
            _fail(f"catalog: 'spot_observed' ends ({last}) before it starts ({first})")
        spot_observed = (first, last)

    raw_types = data.get("instance_types")
    if not isinstance(raw_types, list) or not raw_types:
        _fail("catalog: 'instance_types' must be a non-empty list")
    types: list[InstanceType] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw_types):
        itype = _parse_instance_type(index, entry, regions)
        if itype.name in seen:
            _fail(f"catalog: instance type {itype.name!r} appears twice")
        seen.add(itype.name)
        types.append(itype)
    if spot_observed is None and any(t.spot for t in types):
        _fail("catalog: spot prices without 'spot_observed', the days they were observed")
    raw_cpu = data.get("cpu_instance_types", [])
    if not isinstance(raw_cpu, list):
        _fail("catalog: 'cpu_instance_types' must be a list")
    cpu_types = tuple(_parse_cpu_type(index, entry, regions) for index, entry in enumerate(raw_cpu))

    return Catalog(
        generated=generated,
        source=source,
        regions=regions,
        instance_types=tuple(types),
        ebs_gp3_per_gb_month=ebs,
        spot_observed=spot_observed,
        cpu_instance_types=cpu_types,
    )


def _parse_cpu_type(index: int, entry: Any, regions: tuple[str, ...]) -> InstanceType:
    """One of ``cpu_instance_types``: a GPU type's fields without the GPU's."""
    if not isinstance(entry, Mapping):
        _fail(f"catalog: cpu_instance_types[{index}] must be an object")
    gpu = {"gpu": "none", "gpu_count": 1, "gpu_memory_gib": 1}  # checked by the GPU parser, then dropped
    parsed = _parse_instance_type(index, {**entry, **gpu}, regions)
    return replace(parsed, gpu="", gpu_count=0, gpu_memory_gib=0.0)


def _parse_instance_type(index: int, entry: Any, regions: tuple[str, ...]) -> InstanceType:
    where = f"catalog: instance_types[{index}]"
    if not isinstance(entry, Mapping):
        _fail(f"{where} must be an object, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or "." not in name:
        _fail(f"{where}: 'name' must be an instance type name like 'g4dn.xlarge', got {name!r}")
    where = f"catalog: instance type {name!r} (instance_types[{index}])"

    family = entry.get("family")
    if family != name.split(".", 1)[0]:
        _fail(f"{where}: 'family' must be {name.split('.', 1)[0]!r}, got {family!r}")
    gpu = entry.get("gpu")
    if not isinstance(gpu, str) or not gpu.strip():
        _fail(f"{where}: 'gpu' must be a GPU model name like 'T4', got {gpu!r}")
    gpu_count = _positive_int(entry.get("gpu_count"), f"{where}: 'gpu_count'")
    gpu_memory = _positive_number(entry.get("gpu_memory_gib"), f"{where}: 'gpu_memory_gib'")
    vcpus = _positive_int(entry.get("vcpus"), f"{where}: 'vcpus'")
    memory = _positive_number(entry.get("memory_gib"), f"{where}: 'memory_gib'")
    on_demand = _price_map(entry.get("on_demand"), f"{where}: 'on_demand'", regions)
    if not on_demand:
        _fail(f"{where}: 'on_demand' must price at least one region")
    spot = entry.get("spot", {})
    if not isinstance(spot, Mapping):
        _fail(f"{where}: 'spot' must be an object of zone -> price")
    for zone, price in spot.items():
        if zone_region(zone) not in regions:
            _fail(f"{where}: 'spot' zone {zone!r} is not in one of the catalog's 'regions'")
        _positive_number(price, f"{where}: 'spot'[{zone!r}]")
    return InstanceType(
        name=name,
        family=family,
        gpu=gpu,
        gpu_count=gpu_count,
        gpu_memory_gib=gpu_memory,
        vcpus=vcpus,
        memory_gib=memory,
        on_demand=on_demand,
        spot=MappingProxyType({zone: float(price) for zone, price in spot.items()}),
    )


def zone_region(zone: str) -> str:
    """``us-east-1a`` -> ``us-east-1`` (a zone is its region and a letter)."""
    return zone[:-1] if zone[-1:].isalpha() and zone[-2:-1].isdigit() else ""


def _price_map(value: Any, where: str, regions: tuple[str, ...]) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        _fail(f"{where} must be an object of region -> price")
    prices: dict[str, float] = {}
    for region, price in value.items():
        if region not in regions:
            _fail(f"{where}: region {region!r} is not in the catalog's 'regions'")
        prices[region] = _positive_number(price, f"{where}[{region!r}]")
    return MappingProxyType(prices)


def _iso_date(value: Any, where: str) -> date:
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    _fail(f"{where} must be a YYYY-MM-DD date, got {value!r}")


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(f"{where} must be a positive integer, got {value!r}")
    return value


def _positive_number(value: Any, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        _fail(f"{where} must be a positive number, got {value!r}")
    return float(value)


def _fail(message: str) -> NoReturn:
    raise CloudtrainError(message, _HINT)
