"""The planner: JobSpec + catalog + spot prices -> a costed, printable Plan.

Pure: no AWS, no clock, no I/O. The cloud layer fetches the prices and passes them
in, with ``now`` to judge how fresh they are; without credentials there are none, and
the catalog prices the plan. Every price says where it comes from (``Offer.price_source``
and ``price_label``): ``live`` (observed now), ``catalog`` (the catalog's observed median,
``catalog 2026-12-01``), ``estimate`` (``estimate: on-demand × 0.35``: the catalog has no
observation, or a quote was stale or implausible, like moto's 0.00001 dated 2006) or
``on-demand`` (the catalog's list price). The simulator quotes the catalog's prices, so a
dry-run's are labelled as the catalog's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from cloudtrain.catalog import Catalog, InstanceType
from cloudtrain.errors import PlanError
from cloudtrain.prices import ESTIMATE_LABEL, catalog_spot, estimated_spot, price_problem
from cloudtrain.records import Lifecycle, SpotPrice
from cloudtrain.spec import JobSpec

HOURS_PER_MONTH = 730.0
BASE_IMAGE = "base"  # resources.image: the build's base image, the job environment installed at boot
# What installing a job environment at boot takes (pip's CUDA wheels; conda for GPU Theano):
# a rough figure, never measured on AWS (no GPU where this was written).
BOOT_PROVISION_MIN = {"tensorflow": 15.0, "theano": 30.0}


@dataclass(frozen=True)
class Offer:
    """One way to run the job: an instance type in a zone, at a price."""

    instance: InstanceType
    region: str
    zone: str | None  # None: any zone AWS picks
    lifecycle: Lifecycle
    price_per_hour: float
    on_demand_per_hour: float
    price_source: str  # "live" | "catalog" | "estimate" | "on-demand"
    note: str | None = None  # why a price is an estimate
    price_label: str | None = None  # what the price is, as shown: "catalog 2026-12-01"; None: price_source

    @property
    def label(self) -> str:
        return self.price_label or self.price_source

    @property
    def saving_pct(self) -> float:
        if self.on_demand_per_hour <= 0:
            return 0.0
        return 100.0 * (1.0 - self.price_per_hour / self.on_demand_per_hour)

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_type": self.instance.name,
            "gpu": self.instance.gpu,
            "gpu_count": self.instance.gpu_count,
            "gpu_memory_gib": self.instance.gpu_memory_gib,
            "vcpus": self.instance.vcpus,
            "memory_gib": self.instance.memory_gib,
            "region": self.region,
            "zone": self.zone,
            "lifecycle": self.lifecycle.value,
            "price_per_hour": self.price_per_hour,
            "on_demand_per_hour": self.on_demand_per_hour,
            "saving_pct": round(self.saving_pct, 1),
            "price_source": self.price_source,
            "price_label": self.label,
            "note": self.note,
        }


@dataclass(frozen=True)
class CostEstimate:
    """What the job would cost, all its nodes together, if it ran for ``hours`` (budget.max_hours)."""

    hours: float
    compute_usd: float
    ebs_usd: float

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.ebs_usd

    def to_json(self) -> dict[str, Any]:
        return {
            "hours": self.hours,
            "compute_usd": round(self.compute_usd, 4),
            "ebs_usd": round(self.ebs_usd, 4),
            "total_usd": round(self.total_usd, 4),
        }


@dataclass(frozen=True)
class Plan:
    """The chosen offer, the ranked alternatives, and the cost estimate."""

    job: JobSpec
    region: str
    choice: Offer
    offers: tuple[Offer, ...]  # every candidate, cheapest first
    ebs_per_gb_month: float
    estimate: CostEstimate | None
    catalog_date: date
    simulated: bool
    # where the spot prices come from: "live" (DescribeSpotPriceHistory now), "catalog" (no
    # credentials), "simulated" (the simulator quoting the catalog); "on-demand": no spot
    price_basis: str = "live"
    # resources.image: base: minutes of the instance's time spent installing the job
    # environment at boot, before training starts (None: the cloudtrain image has it)
    boot_provision_min: float | None = None

    @property
    def lifecycle(self) -> Lifecycle:
        return self.choice.lifecycle

    @property
    def nodes(self) -> int:
        """Instances of the chosen type the job runs on (resources.nodes); each offer prices one."""
        return self.job.resources.nodes

    @property
    def price_per_hour_all_nodes(self) -> float:
        """USD per hour of the choice for all the job's nodes."""
        return self.choice.price_per_hour * self.nodes

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "job": self.job.name,
            "backend": self.job.backend,
            "region": self.region,
            "lifecycle": self.lifecycle.value,
            "nodes": self.nodes,
            "max_price": self.job.resources.max_price,
            "disk_gb": self.job.resources.disk_gb,
            "ebs_per_gb_month": self.ebs_per_gb_month,
            "choice": self.choice.to_json(),
            "offers": [offer.to_json() for offer in self.offers],
            "estimate": self.estimate.to_json() if self.estimate else None,
            "catalog_date": self.catalog_date.isoformat(),
            "price_basis": self.price_basis,
            "simulated": self.simulated,
            "boot_provision_min": self.boot_provision_min,
        }


def candidate_types(spec: JobSpec, catalog: Catalog) -> list[InstanceType]:
    """The instance types that satisfy the job's gpu / instance_type request (and, for a
    theano job, carry a GPU the Theano image can drive: PlanError naming them otherwise)."""
    res = spec.resources
    if res.instance_type is not None:
        found = catalog.get(res.instance_type)
        types = [found] if found else []
    elif res.gpu_model is not None:
        model, count = catalog.canonical_gpu(res.gpu_model), res.gpu_count
        types = [t for t in catalog.instance_types if t.gpu == model and t.gpu_count == count]
    else:
        types = [t for t in catalog.instance_types if t.gpu_count == 1]
    allowed = catalog.theano_gpus
    if spec.backend != "theano" or allowed is None:
        return types
    driven = [t for t in types if t.gpu in allowed]
    if types and not driven:
        asked = sorted({t.gpu for t in types})
        key = "resources.instance_type" if res.instance_type else "resources.gpu"
        raise PlanError(
            f"backend: theano cannot drive {', '.join(asked)} ({key}): the Theano image "
            f"(CUDA {catalog.theano_cuda}) supports only {', '.join(allowed)}",
            hint=f"Set resources.gpu to one of {', '.join(allowed)}, or use backend: tensorflow.",
        )
    return driven


def describe_request(spec: JobSpec) -> str:
    res = spec.resources
    if res.instance_type:
        return res.instance_type
    if res.gpu:
        return f"{res.gpu_count} x {res.gpu_model}"
    return "a single-GPU instance"


def _latest(prices: Iterable[SpotPrice]) -> dict[tuple[str, str], SpotPrice]:
    latest: dict[tuple[str, str], SpotPrice] = {}
    for price in prices:
        key = (price.instance_type, price.zone)
        if key not in latest or price.timestamp > latest[key].timestamp:
            latest[key] = price
    return latest


def _estimate(itype: InstanceType, region: str, zone: str | None, on_demand: float, why: str | None) -> Offer:
    price = estimated_spot(on_demand)
    return Offer(itype, region, zone, Lifecycle.SPOT, price, on_demand, "estimate", why, ESTIMATE_LABEL)


def catalog_label(catalog: Catalog) -> str:
    """``catalog 2026-12-01``: the last day of its observed spot prices (else its date)."""
    return f"catalog {catalog.spot_observed[1] if catalog.spot_observed else catalog.generated}"


def _catalog_spot_offers(
    itype: InstanceType, region: str, on_demand: float, zones: Sequence[str] | None, catalog: Catalog
) -> list[Offer]:
    """Without live prices: the catalog's observed median per zone, else one estimate."""
    observed = {z: p for z, p in itype.observed_spot(region).items() if not zones or z in zones}
    if not observed:
        return [_estimate(itype, region, None, on_demand, None)]
    window = catalog.spot_observed
    assert window is not None  # parse_catalog: spot prices come with their window
    note = f"median spot price observed {window[0]} to {window[1]}"
    label = catalog_label(catalog)
    return [
        Offer(itype, region, zone, Lifecycle.SPOT, price, on_demand, "catalog", note, label)
        for zone, price in sorted(observed.items())
    ]


def _spot_offers(
    itype: InstanceType,
    region: str,
    on_demand: float,
    observed: dict[tuple[str, str], SpotPrice],
    zones: Sequence[str] | None,
    now: datetime,
    simulated: bool,
    catalog: Catalog,
) -> list[Offer]:
    quotes = [
        p
        for (name, zone), p in observed.items()
        if name == itype.name and zone.startswith(region) and (not zones or zone in zones)
    ]
    if not quotes:
        if zones:  # no price history there: the type is not offered in those zones
            return []
        return [_estimate(itype, region, None, on_demand, "no spot price history")]
    offers = []
    for quote in quotes:
        problem = price_problem(quote.price, on_demand, quote.timestamp, now)
        if problem is not None:
            offers.append(_estimate(itype, region, quote.zone, on_demand, f"spot quote {problem}"))
        elif simulated:  # the simulator quotes the catalog (prices.catalog_spot): say which part
            _, seen = catalog_spot(itype.spot.get(quote.zone), on_demand)
            source, label = ("catalog", catalog_label(catalog)) if seen else ("estimate", ESTIMATE_LABEL)
            offers.append(
                Offer(itype, region, quote.zone, Lifecycle.SPOT, quote.price, on_demand, source, None, label)
            )
        else:
            offers.append(Offer(itype, region, quote.zone, Lifecycle.SPOT, quote.price, on_demand, "live"))
    return offers


def plan(
    spec: JobSpec,
    catalog: Catalog,
    prices: Iterable[SpotPrice] | None,
    *,
    region: str,
    now: datetime,
    simulated: bool = False,
) -> Plan:
    """Choose the cheapest offer that fits the job; raise ``PlanError`` if none does.

    ``prices``: the spot price observations of the candidate types; None when there are
    none to be had (no credentials): the catalog prices the plan."""
    res = spec.resources
    types = candidate_types(spec, catalog)
    offered = [t for t in types if t.on_demand_price(region) is not None]
    if not offered:
        elsewhere = sorted({r for t in types for r in t.on_demand})
        raise PlanError(
            f"no {describe_request(spec)} is offered in {region} (catalog of {catalog.generated})",
            hint=f"Set resources.region to one of: {', '.join(elsewhere)}"
            if elsewhere
            else "Choose another resources.gpu or resources.instance_type.",
        )
    observed = _latest(prices or [])
    listed = f"catalog {catalog.generated}"
    offers: list[Offer] = []
    for itype in offered:
        on_demand = itype.on_demand_price(region)
        assert on_demand is not None
        if not res.spot:
            zone = res.zones[0] if res.zones else None
            offers.append(
                Offer(
                    itype, region, zone, Lifecycle.ON_DEMAND, on_demand, on_demand, "on-demand", None, listed
                )
            )
        elif prices is None:
            offers += _catalog_spot_offers(itype, region, on_demand, res.zones, catalog)
        else:
            offers += _spot_offers(itype, region, on_demand, observed, res.zones, now, simulated, catalog)
    if not offers:
        raise PlanError(
            f"no {describe_request(spec)} spot offer in zones {', '.join(res.zones or [])}",
            hint="Remove resources.zones or list other zones of the region.",
        )
    offers.sort(key=lambda o: (o.price_per_hour, o.on_demand_per_hour, o.instance.name, o.zone or ""))
    affordable = [o for o in offers if res.max_price is None or o.price_per_hour <= res.max_price]
    if not affordable:
        cheapest = offers[0]
        where = cheapest.zone or region
        raise PlanError(
            f"no offer under max_price ${res.max_price:.4f}/h: the cheapest is "
            f"{cheapest.instance.name} in {where} at ${cheapest.price_per_hour:.4f}/h "
            f"({cheapest.lifecycle.value}, {cheapest.label})",
            hint="Raise resources.max_price, or ask for a cheaper resources.gpu.",
        )
    choice = affordable[0]
    ebs_rate = catalog.ebs_price(region)
    estimate = None
    if spec.budget.max_hours is not None:  # each node has its own instance and root volume
        hours = spec.budget.max_hours
        estimate = CostEstimate(
            hours=hours,
            compute_usd=res.nodes * choice.price_per_hour * hours,
            ebs_usd=res.nodes * res.disk_gb * ebs_rate * hours / HOURS_PER_MONTH,
        )
    return Plan(
        job=spec,
        region=region,
        choice=choice,
        offers=tuple(offers),
        ebs_per_gb_month=ebs_rate,
        estimate=estimate,
        catalog_date=catalog.generated,
        simulated=simulated,
        price_basis="on-demand"
        if not res.spot
        else "catalog"
        if prices is None
        else "simulated"
        if simulated
        else "live",
        boot_provision_min=BOOT_PROVISION_MIN[spec.backend] if res.image == BASE_IMAGE else None,
    )


def launch_offers(plan: Plan, limit: int) -> list[Offer]:
    """What to try launching, in order, when capacity runs out: the plan's choice, then the
    next affordable offers of its lifecycle (other zones, then other types), at most
    ``limit``; with ``resources.fallback: on-demand``, the cheapest on-demand type last
    (unless it costs more than ``max_price``)."""
    res = plan.job.resources
    choice = plan.choice
    chosen: list[Offer] = [choice]
    seen = {(choice.instance.name, choice.zone, choice.lifecycle)}
    for offer in plan.offers:
        key = (offer.instance.name, offer.zone, offer.lifecycle)
        affordable = res.max_price is None or offer.price_per_hour <= res.max_price
        if key not in seen and offer.lifecycle is choice.lifecycle and affordable:
            chosen.append(offer)
            seen.add(key)
    chosen = chosen[: limit - 1 if res.fallback == "on-demand" else limit]
    if res.fallback != "on-demand" or choice.lifecycle is not Lifecycle.SPOT:
        return chosen
    cheapest = min(plan.offers, key=lambda o: (o.on_demand_per_hour, o.instance.name))
    if res.max_price is None or cheapest.on_demand_per_hour <= res.max_price:
        chosen.append(
            Offer(
                cheapest.instance,
                plan.region,
                None,
                Lifecycle.ON_DEMAND,
                cheapest.on_demand_per_hour,
                cheapest.on_demand_per_hour,
                "on-demand",
                "fallback: no spot capacity",
                f"catalog {plan.catalog_date}",
            )
        )
    return chosen
