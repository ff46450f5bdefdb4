"""Regenerate the packaged instance catalog (``cloudtrain/data/catalog.json``) from AWS.

    python -m cloudtrain.cloud.catalog_update --out cloudtrain/data/catalog.json \
        [--regions us-east-1 eu-west-1 ...] [--families g4dn g5 ...] [--profile P] [--no-spot]
    python -m cloudtrain.cloud.catalog_update --out cloudtrain/data/catalog.json \
        --public-prices [--price-list-url URL] [--regions ...] [--families ...]

With credentials (the default): GPU facts (model, count, memory per GPU, vCPUs, memory)
come from EC2 ``DescribeInstanceTypes`` in each region; on-demand Linux shared-tenancy
prices and the EBS gp3 GB-month price come from the AWS Price List API (``pricing`` in
us-east-1); and, unless ``--no-spot``, the observed spot price of each type in each zone
comes from EC2 ``DescribeSpotPriceHistory`` (``Linux/UNIX``, the last 7 days): the
*time-weighted* median over the window, since AWS records a price only when it changes
(each record holds from its timestamp, or the window start if earlier, until the next
record of that type and zone, or the window end). It is written per type as ``"spot":
{zone: USD/h}`` (4 decimals; a type without history has none), and the window's days as
``"spot_observed": {"from": ..., "to": ...}``. It needs credentials allowed
``ec2:DescribeInstanceTypes``, ``ec2:DescribeSpotPriceHistory`` and
``pricing:GetProducts``; it reads, never creates, anything.

Without credentials (``--public-prices``): on-demand Linux prices and the EBS gp3 price
come from AWS's public bulk price-list files, one CSV per region
(``{base}/{region}/index.csv``, base ``PRICE_LIST_URL``, or ``--price-list-url``, or the
environment variable ``CLOUDTRAIN_PRICE_LIST_URL``). The files are hundreds of MB to GB:
they are streamed line by line through ``csv.reader``, never read whole. Five metadata
rows (FormatVersion, Disclaimer, Publication Date, Version, OfferCode) come before the
header row; a price is a row whose ``TermType`` is ``OnDemand`` and whose ``Operating
System``, ``Tenancy``, ``Pre Installed S/W``, ``CapacityStatus`` and ``License Model``
are those of the Price List API filters (``_INSTANCE_TERMS``), in that ``Region Code``.
GPU facts cannot be had reliably from these files: each type's facts are kept from the
existing catalog (the ``--out`` file if it exists, else the packaged one), only prices
are refreshed. ``generated`` is the price list's publication date and ``source`` says so.
Spot prices need credentials: this mode writes none (and no ``spot_observed``).

The parsing functions (``parse_instance_type``, ``parse_instance_price``,
``parse_ebs_gp3_price``, ``time_weighted_median``, ``parse_spot_history``,
``parse_price_list``) and the assembly (``build_catalog``) are pure; the ``fetch_*``
functions take boto3 clients, so tests drive them with recorded responses through
``botocore.stub.Stubber``; ``open_price_list`` is the only code that downloads, with
stdlib urllib.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import io
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped,unused-ignore]
import botocore.exceptions  # type: ignore[import-untyped,unused-ignore]
from botocore.config import Config  # type: ignore[import-untyped,unused-ignore]

from cloudtrain.catalog import SCHEMA, Catalog, load_catalog, parse_catalog, zone_region
from cloudtrain.errors import CloudError, CloudtrainError, CredentialsError

log = logging.getLogger(__name__)

#: The GPU families in the catalog, in the order they are listed.
FAMILIES: tuple[str, ...] = ("g4dn", "g5", "g6", "g6e", "p3", "p3dn", "p4d", "p5")
DEFAULT_REGIONS: tuple[str, ...] = (
    "us-east-1",
    "us-east-2",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-northeast-1",
)
#: The Price List API is served from us-east-1 (and a few others); prices cover all regions.
PRICING_REGION = "us-east-1"
SERVICE_CODE = "AmazonEC2"

# What "on-demand Linux" means in the Price List API's product attributes.
_INSTANCE_TERMS: tuple[tuple[str, str], ...] = (
    ("operatingSystem", "Linux"),
    ("tenancy", "Shared"),
    ("preInstalledSw", "NA"),
    ("capacitystatus", "Used"),
    ("licenseModel", "No License required"),
)

#: Spot prices: the product whose history is read, and the window, in days, up to now.
SPOT_PRODUCT = "Linux/UNIX"
SPOT_DAYS = 7

#: AWS's public price-list files of the AmazonEC2 offer: ``{base}/{region}/index.csv``.
PRICE_LIST_URL = "https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current"
PRICE_LIST_URL_ENV = "CLOUDTRAIN_PRICE_LIST_URL"
PRICE_LIST_TIMEOUT_S = 60.0

# The price-list CSV's column for each Price List API attribute used here. The CSV's
# header is the attributes' display names (AWS Billing user guide, "Reading the service
# price list file"; checked against a published AmazonEC2 file, 2025-09-12).
_CSV_COLUMNS: dict[str, str] = {
    "instanceType": "Instance Type",
    "regionCode": "Region Code",
    "operatingSystem": "Operating System",
    "tenancy": "Tenancy",
    "preInstalledSw": "Pre Installed S/W",
    "capacitystatus": "CapacityStatus",
    "licenseModel": "License Model",
    "productFamily": "Product Family",
    "volumeApiName": "Volume API Name",
    "locationType": "Location Type",
    "operation": "operation",
    "marketoption": "MarketOption",
}
# The pricing columns, before the product's.
_CSV_TERM_COLUMNS: tuple[str, ...] = ("TermType", "Unit", "PricePerUnit", "Currency")
# Columns a product may lack (an empty cell, too, is the attribute's absence).
_CSV_OPTIONAL_COLUMNS = frozenset({"operation", "MarketOption"})
# How many rows may come before the header (five metadata rows, as published).
_CSV_MAX_PREAMBLE = 20
_PRICE_LIST_HINT = (
    f"Check the --regions names, the network, and --price-list-url / ${PRICE_LIST_URL_ENV} "
    f"(default {PRICE_LIST_URL})."
)

_CONFIG = Config(retries={"mode": "standard", "max_attempts": 10})

_CREDENTIAL_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.ProfileNotFound,
    botocore.exceptions.SSOTokenLoadError,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.UnauthorizedSSOTokenError,
)
_BAD_CREDENTIAL_CODES = frozenset(
    {
        "AuthFailure",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})
_CREDENTIALS_HINT = (
    "Configure AWS credentials (`aws configure`, `aws sso login`, AWS_PROFILE or --profile). "
    "The catalog update needs ec2:DescribeInstanceTypes, ec2:DescribeSpotPriceHistory and "
    "pricing:GetProducts; --public-prices needs no credentials (but keeps no spot prices)."
)


@dataclass(frozen=True)
class GpuFacts:
    """What DescribeInstanceTypes says about one GPU instance type."""

    name: str
    family: str
    gpu: str
    gpu_count: int
    gpu_memory_gib: float  # per GPU
    vcpus: int
    memory_gib: float


@dataclass(frozen=True)
class PriceListInfo:
    """The metadata rows of a public price-list file."""

    offer_code: str
    version: str
    published: datetime  # "Publication Date", UTC
    format_version: str = ""


@dataclass(frozen=True)
class PublicPrices:
    """What one region's public price-list file says: on-demand USD/hour, gp3 USD/GB-month."""

    region: str
    info: PriceListInfo
    on_demand: Mapping[str, float] = field(default_factory=dict)
    ebs_gp3: float | None = None


# ---------------------------------------------------------------------------------------
# Pure: request parameters


def instance_type_filters(families: Iterable[str]) -> list[dict[str, Any]]:
    """DescribeInstanceTypes filters selecting every size of ``families`` (``g4dn.*``)."""
    return [{"Name": "instance-type", "Values": [f"{family}.*" for family in families]}]


def term_filters(*terms: tuple[str, str]) -> list[dict[str, str]]:
    """Price List API ``TERM_MATCH`` filters, in the order given."""
    return [{"Type": "TERM_MATCH", "Field": field, "Value": value} for field, value in terms]


def instance_price_filters(instance_type: str, region: str) -> list[dict[str, str]]:
    """Filters selecting the on-demand Linux shared-tenancy product of one type in one region."""
    return term_filters(("instanceType", instance_type), ("regionCode", region), *_INSTANCE_TERMS)


def ebs_gp3_price_filters(region: str) -> list[dict[str, str]]:
    """Filters selecting the EBS gp3 storage product (GB-month) in one region."""
    return term_filters(("productFamily", "Storage"), ("volumeApiName", "gp3"), ("regionCode", region))


def spot_window(end: datetime, days: int = SPOT_DAYS) -> tuple[datetime, datetime]:
    """(start, end) of the spot history read: the ``days`` before ``end`` (UTC)."""
    end = _utc(end)
    return end - timedelta(days=days), end


def spot_history_params(instance_types: Iterable[str], start: datetime, end: datetime) -> dict[str, Any]:
    """DescribeSpotPriceHistory parameters: Linux/UNIX prices of ``instance_types``, all zones."""
    return {
        "InstanceTypes": sorted(instance_types),
        "ProductDescriptions": [SPOT_PRODUCT],
        "StartTime": start,
        "EndTime": end,
    }


def price_list_url(region: str, base_url: str | None = None) -> str:
    """The public price-list CSV of ``region``: ``{base}/{region}/index.csv``.

    The base is ``base_url``, else ``$CLOUDTRAIN_PRICE_LIST_URL``, else ``PRICE_LIST_URL``.
    """
    base = base_url or os.environ.get(PRICE_LIST_URL_ENV) or PRICE_LIST_URL
    return f"{base.rstrip('/')}/{region}/index.csv"


# ---------------------------------------------------------------------------------------
# Pure: response parsing


def parse_instance_type(item: Mapping[str, Any]) -> GpuFacts | None:
    """GPU facts from one DescribeInstanceTypes ``InstanceTypes`` entry; None without a GPU."""
    name = item["InstanceType"]
    gpus = (item.get("GpuInfo") or {}).get("Gpus") or []
    if not gpus:
        return None
    if len(gpus) > 1:
        log.warning("%s reports %d GPU kinds; using the first", name, len(gpus))
    gpu = gpus[0]
    count = int(gpu.get("Count", 0))
    if count < 1:  # fractional GPU types (g6f) report Count 0
        return None
    return GpuFacts(
        name=name,
        family=name.split(".", 1)[0],
        gpu=str(gpu["Name"]),
        gpu_count=count,
        gpu_memory_gib=_gib(gpu["MemoryInfo"]["SizeInMiB"]),
        vcpus=int(item["VCpuInfo"]["DefaultVCpus"]),
        memory_gib=_gib(item["MemoryInfo"]["SizeInMiB"]),
    )


def load_price_item(item: str | Mapping[str, Any]) -> Mapping[str, Any]:
    """One ``PriceList`` entry: the API returns each as a JSON *string*."""
    loaded = json.loads(item) if isinstance(item, str) else item
    if not isinstance(loaded, Mapping):
        raise CloudError(f"unexpected Price List entry: {str(item)[:200]}")
    return loaded


def on_demand_usd(item: Mapping[str, Any], unit: str) -> list[float]:
    """The USD prices of an item's on-demand price dimensions billed per ``unit``."""
    prices: list[float] = []
    for term in (item.get("terms", {}).get("OnDemand") or {}).values():
        for dimension in (term.get("priceDimensions") or {}).values():
            if dimension.get("unit") != unit:
                continue
            usd = (dimension.get("pricePerUnit") or {}).get("USD")
            if usd is None:
                continue
            prices.append(float(usd))
    return prices


def parse_instance_price(
    items: Iterable[str | Mapping[str, Any]], instance_type: str, region: str
) -> float | None:
    """The on-demand USD/hour of ``instance_type`` in ``region`` from get_products items.

    Items that are not plain on-demand Linux for that type and region are skipped (the
    filters should already exclude them). None when nothing is left: the type is not
    offered there. If several prices remain, the highest is taken, so that estimates
    err on the expensive side.
    """
    wanted = {"instanceType": instance_type, "regionCode": region, **dict(_INSTANCE_TERMS)}
    found: set[float] = set()
    for raw in items:
        item = load_price_item(raw)
        attributes = item.get("product", {}).get("attributes", {})
        if any(attributes.get(key) != value for key, value in wanted.items()):
            continue
        if attributes.get("operation", "RunInstances") != "RunInstances":
            continue
        if attributes.get("marketoption", "OnDemand") != "OnDemand":
            continue
        found.update(price for price in on_demand_usd(item, "Hrs") if price > 0)
    if not found:
        return None
    if len(found) > 1:
        log.warning(
            "%s in %s has several on-demand prices %s; using the highest",
            instance_type,
            region,
            sorted(found),
        )
    return max(found)


def parse_ebs_gp3_price(items: Iterable[str | Mapping[str, Any]], region: str) -> float | None:
    """The EBS gp3 USD per GB-month in ``region`` from get_products items, or None."""
    found: set[float] = set()
    for raw in items:
        item = load_price_item(raw)
        product = item.get("product", {})
        attributes = product.get("attributes", {})
        if product.get("productFamily") != "Storage":
            continue
        if attributes.get("volumeApiName") != "gp3" or attributes.get("regionCode") != region:
            continue
        if attributes.get("locationType", "AWS Region") != "AWS Region":
            continue
        found.update(price for price in on_demand_usd(item, "GB-Mo") if price > 0)
    return max(found) if found else None


def time_weighted_median(
    observations: Iterable[tuple[datetime, float]], start: datetime, end: datetime
) -> float | None:
    """The median price over [start, end), each price weighted by how long it held.

    ``observations`` are (timestamp, price) records of one type in one zone, in any order.
    A record holds from its timestamp (or ``start``, if earlier: AWS also returns the price
    in effect at the start time) until the next record, or ``end``. Time before the first
    record is unknown and not counted. When the prices below and above the middle hold
    exactly half the time each, their mean is taken. None when no time is covered.
    """
    start, end = _utc(start), _utc(end)
    points = sorted(((_utc(when), float(price)) for when, price in observations), key=lambda o: o[0])
    held: dict[float, int] = {}  # price -> microseconds
    for i, (when, price) in enumerate(points):
        begin = max(when, start)
        stop = min(points[i + 1][0], end) if i + 1 < len(points) else end
        if stop > begin:
            held[price] = held.get(price, 0) + (stop - begin) // timedelta(microseconds=1)
    total = sum(held.values())
    if not total:
        return None
    prices = sorted(held)
    so_far = 0
    for i, price in enumerate(prices):
        so_far += held[price]
        if 2 * so_far > total:
            return price
        if 2 * so_far == total:  # the rest, also half the time, starts at the next price
            return (price + prices[i + 1]) / 2
    raise AssertionError("unreachable: the weights add up to the total")


def parse_spot_history(
    items: Iterable[Mapping[str, Any]], region: str, start: datetime, end: datetime
) -> dict[str, dict[str, float]]:
    """instance type -> zone -> time-weighted median spot price (USD/h, 4 decimals).

    ``items`` are DescribeSpotPriceHistory ``SpotPriceHistory`` entries of ``region``.
    Records of other products, and of zones that are not the region's own (Local Zones,
    ``us-east-1-bos-1a``), are skipped. A type or zone without history gets no entry.
    """
    series: dict[tuple[str, str], list[tuple[datetime, float]]] = {}
    for item in items:
        if item.get("ProductDescription", SPOT_PRODUCT) != SPOT_PRODUCT:
            continue
        zone = str(item.get("AvailabilityZone", ""))
        if zone_region(zone) != region:
            log.debug("spot history: zone %r is not one of %s's; skipped", zone, region)
            continue
        try:
            name = str(item["InstanceType"])
            price = float(item["SpotPrice"])
            when = item["Timestamp"]
            if isinstance(when, str):
                when = datetime.fromisoformat(when.replace("Z", "+00:00"))
        except (KeyError, TypeError, ValueError) as e:
            raise CloudError(f"unexpected DescribeSpotPriceHistory entry {dict(item)!r}: {e}") from e
        series.setdefault((name, zone), []).append((when, price))
    medians: dict[str, dict[str, float]] = {}
    for (name, zone), observed in sorted(series.items()):
        median = time_weighted_median(observed, start, end)
        if median is not None and round(median, 4) > 0:
            medians.setdefault(name, {})[zone] = round(median, 4)
    return medians


def parse_price_list(
    lines: Iterable[str], region: str, instance_types: Collection[str] | None = None
) -> PublicPrices:
    """On-demand Linux prices and the gp3 price of ``region`` from its public price-list CSV.

    ``lines`` is the file's text, line by line (a stream: it is read once, row by row, and
    never held whole). ``instance_types`` limits which types are kept (None: all). The
    rules are those of ``parse_instance_price`` and ``parse_ebs_gp3_price``, on the CSV's
    columns: ``TermType`` OnDemand, ``Currency`` USD, ``Region Code`` the region,
    ``Location Type`` AWS Region; instances ``Unit`` Hrs and the ``_INSTANCE_TERMS``
    (``Operating System`` Linux, ``Tenancy`` Shared, ``Pre Installed S/W`` NA,
    ``CapacityStatus`` Used, ``License Model`` No License required), ``operation``
    RunInstances and ``MarketOption`` OnDemand where given; gp3 ``Product Family`` Storage,
    ``Volume API Name`` gp3, ``Unit`` GB-Mo. Zero prices are skipped; of several prices
    the highest is taken (logged), so that estimates err on the expensive side.
    """
    rows = csv.reader(lines)
    info, header = _read_price_list_preamble(rows, region)
    col = {name: i for i, name in enumerate(header)}
    needed = (*_CSV_TERM_COLUMNS, *_CSV_COLUMNS.values())
    missing = [name for name in needed if name not in col and name not in _CSV_OPTIONAL_COLUMNS]
    if missing:
        raise CloudError(
            f"the {region} price list has no column {', '.join(repr(m) for m in missing)}",
            "AWS may have changed the price-list format: compare the file's header row with "
            "_CSV_COLUMNS in cloudtrain/cloud/catalog_update.py.",
        )
    term, unit, price_at, currency = (col[name] for name in _CSV_TERM_COLUMNS)
    region_at, location_at = col[_CSV_COLUMNS["regionCode"]], col[_CSV_COLUMNS["locationType"]]
    type_at, family_at = col[_CSV_COLUMNS["instanceType"]], col[_CSV_COLUMNS["productFamily"]]
    volume_at = col[_CSV_COLUMNS["volumeApiName"]]
    linux = [(col[_CSV_COLUMNS[attribute]], value) for attribute, value in _INSTANCE_TERMS]
    operation_at = col.get(_CSV_COLUMNS["operation"])
    market_at = col.get(_CSV_COLUMNS["marketoption"])
    wanted = None if instance_types is None else frozenset(instance_types)
    width = len(header)

    found: dict[str, set[float]] = {}
    gp3: set[float] = set()
    for row in rows:
        if len(row) < width:
            row = row + [""] * (width - len(row))
        if row[term] != "OnDemand" or row[currency] != "USD" or row[region_at] != region:
            continue
        if (row[location_at] or "AWS Region") != "AWS Region":
            continue
        if row[unit] == "Hrs":
            name = row[type_at]
            if not name or (wanted is not None and name not in wanted):
                continue
            if any(row[at] != value for at, value in linux):
                continue
            if operation_at is not None and (row[operation_at] or "RunInstances") != "RunInstances":
                continue
            if market_at is not None and (row[market_at] or "OnDemand") != "OnDemand":
                continue
            price = _csv_price(row[price_at], region, rows.line_num)
            if price > 0:
                found.setdefault(name, set()).add(price)
        elif row[unit] == "GB-Mo" and row[family_at] == "Storage" and row[volume_at] == "gp3":
            price = _csv_price(row[price_at], region, rows.line_num)
            if price > 0:
                gp3.add(price)

    on_demand: dict[str, float] = {}
    for name, prices in sorted(found.items()):
        if len(prices) > 1:
            log.warning(
                "%s in %s has several on-demand prices %s; using the highest", name, region, sorted(prices)
            )
        on_demand[name] = max(prices)
    if len(gp3) > 1:
        log.warning("EBS gp3 in %s has several prices %s; using the highest", region, sorted(gp3))
    return PublicPrices(region, info, on_demand, max(gp3) if gp3 else None)


def _read_price_list_preamble(rows: Iterator[list[str]], region: str) -> tuple[PriceListInfo, list[str]]:
    """The metadata rows ("FormatVersion", "v1.0" ...) and the header row (from "SKU")."""
    meta: dict[str, str] = {}
    for count, row in enumerate(rows, 1):
        if row and row[0] == "SKU":
            return _price_list_info(meta, region), row
        if count > _CSV_MAX_PREAMBLE or len(row) > 2:
            break
        if len(row) == 2:
            meta[row[0]] = row[1]
    raise CloudError(
        f"the {region} price list is not an AWS price-list CSV (no header row starting with 'SKU')",
        _PRICE_LIST_HINT,
    )


def _price_list_info(meta: Mapping[str, str], region: str) -> PriceListInfo:
    offer = meta.get("OfferCode", "")
    if offer != SERVICE_CODE:
        raise CloudError(
            f"the {region} price list is for offer {offer or 'unknown'!r}, not {SERVICE_CODE!r}",
            _PRICE_LIST_HINT,
        )
    raw = meta.get("Publication Date", "")
    try:
        published = _utc(datetime.fromisoformat(raw.replace("Z", "+00:00")))
    except ValueError:
        raise CloudError(
            f"the {region} price list has no valid 'Publication Date' (got {raw!r})", _PRICE_LIST_HINT
        ) from None
    return PriceListInfo(
        offer_code=offer,
        version=meta.get("Version", ""),
        published=published,
        format_version=meta.get("FormatVersion", ""),
    )


def _csv_price(text: str, region: str, line: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise CloudError(f"the {region} price list has a bad price {text!r} on line {line}") from None


def facts_from_catalog(catalog: Catalog, families: Sequence[str] = FAMILIES) -> list[GpuFacts]:
    """The GPU facts of a catalog's types of ``families`` (its prices are not kept)."""
    return [
        GpuFacts(t.name, t.family, t.gpu, t.gpu_count, t.gpu_memory_gib, t.vcpus, t.memory_gib)
        for t in catalog.instance_types
        if t.family in families
    ]


# ---------------------------------------------------------------------------------------
# Pure: assembly and output


def build_catalog(
    facts: Iterable[GpuFacts],
    prices: Mapping[str, Mapping[str, float]],
    ebs_gp3: Mapping[str, float],
    regions: Sequence[str],
    *,
    families: Sequence[str] = FAMILIES,
    today: date | None = None,
    spot: Mapping[str, Mapping[str, float]] | None = None,
    spot_observed: tuple[date, date] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """The catalog.json document: ``prices`` is instance type -> region -> USD/hour.

    ``spot`` is instance type -> zone -> observed spot USD/hour over the days
    ``spot_observed`` (first, last); only zones of ``regions`` are kept, and a type with
    none gets no ``spot``; ``spot_observed`` is written only where some type has one.
    ``source`` replaces the default text (the Price List API's). Types without a price in
    any of ``regions`` are left out (logged). The result is checked with
    ``cloudtrain.catalog.parse_catalog`` before it is returned.
    """
    if spot and spot_observed is None:
        raise ValueError("spot prices need spot_observed, the days they were observed")
    generated = today or date.today()
    rank = {family: i for i, family in enumerate(families)}
    entries: list[dict[str, Any]] = []
    for fact in sorted(facts, key=lambda f: (rank.get(f.family, len(rank)), f.vcpus, f.gpu_count, f.name)):
        type_prices = prices.get(fact.name, {})
        on_demand = {r: float(type_prices[r]) for r in regions if type_prices.get(r)}
        if not on_demand:
            log.warning("%s has no on-demand price in %s; left out", fact.name, ", ".join(regions))
            continue
        entries.append(
            {
                "name": fact.name,
                "family": fact.family,
                "gpu": fact.gpu,
                "gpu_count": fact.gpu_count,
                "gpu_memory_gib": _number(fact.gpu_memory_gib),
                "vcpus": fact.vcpus,
                "memory_gib": _number(fact.memory_gib),
                "on_demand": on_demand,
            }
        )
        observed = {
            zone: round(float(price), 4)
            for zone, price in sorted((spot or {}).get(fact.name, {}).items())
            if zone_region(zone) in regions and price
        }
        if observed:
            entries[-1]["spot"] = observed
    if not entries:
        raise CloudError(
            f"no GPU instance type of {', '.join(families)} has a price in {', '.join(regions)}",
            "Check the --families and --regions names.",
        )
    ebs = {r: float(ebs_gp3[r]) for r in regions if ebs_gp3.get(r)}
    if not ebs:
        raise CloudError(f"no EBS gp3 price found for {', '.join(regions)}")
    with_spot = spot_observed is not None and any("spot" in entry for entry in entries)
    if source is None:
        source = (
            "AWS Price List API (AmazonEC2 on-demand, Linux, shared tenancy, USD per hour; "
            "EBS gp3 USD per GB-month) and EC2 DescribeInstanceTypes"
        )
        if with_spot and spot_observed is not None:
            source += (
                "; spot: time-weighted median of EC2 DescribeSpotPriceHistory (Linux/UNIX) per "
                f"zone, {spot_observed[0].isoformat()} to {spot_observed[1].isoformat()}"
            )
        source += f", fetched {generated.isoformat()} by cloudtrain.cloud.catalog_update"
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "generated": generated.isoformat(),
        "source": source,
        "currency": "USD",
        "regions": list(regions),
        "ebs_gp3_per_gb_month": ebs,
    }
    if with_spot and spot_observed is not None:
        data["spot_observed"] = {"from": spot_observed[0].isoformat(), "to": spot_observed[1].isoformat()}
    data["cpu_instance_types"] = packaged_cpu_types(regions)
    data["instance_types"] = entries
    parse_catalog(data)  # the same validation the loader applies
    return data


def packaged_cpu_types(regions: Sequence[str]) -> list[dict[str, Any]]:
    """The packaged catalog's ``cpu_instance_types`` (``doctor --launch``'s small type), kept
    as they are (not refreshed) for the prices of ``regions``."""
    from importlib import resources

    data = json.loads(resources.files("cloudtrain").joinpath("data/catalog.json").read_text(encoding="utf-8"))
    kept = []
    for entry in data.get("cpu_instance_types", []):
        on_demand = {r: p for r, p in entry.get("on_demand", {}).items() if r in regions}
        if on_demand:
            kept.append({**entry, "on_demand": on_demand})
    return kept


def dump_catalog(data: Mapping[str, Any]) -> str:
    """The catalog as text, in the layout of the shipped file."""
    return json.dumps(data, indent=2) + "\n"


def write_catalog(data: Mapping[str, Any], path: Path) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(dump_catalog(data))
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


# ---------------------------------------------------------------------------------------
# AWS calls (clients are passed in; nothing is created at import time)


def fetch_gpu_facts(ec2: Any, families: Sequence[str] = FAMILIES) -> list[GpuFacts]:
    """GPU facts for every size of ``families`` that ``ec2``'s region offers."""
    facts: list[GpuFacts] = []
    with aws_errors("describe EC2 instance types"):
        paginator = ec2.get_paginator("describe_instance_types")
        for page in paginator.paginate(Filters=instance_type_filters(families)):
            for item in page.get("InstanceTypes", []):
                fact = parse_instance_type(item)
                if fact is not None and fact.family in families:
                    facts.append(fact)
    return facts


def get_products(pricing: Any, filters: list[dict[str, str]]) -> list[str]:
    """Every ``PriceList`` entry (JSON strings) matching ``filters`` in AmazonEC2."""
    items: list[str] = []
    with aws_errors("query the AWS Price List API"):
        paginator = pricing.get_paginator("get_products")
        for page in paginator.paginate(ServiceCode=SERVICE_CODE, Filters=filters, FormatVersion="aws_v1"):
            items.extend(page.get("PriceList", []))
    return items


def fetch_instance_price(pricing: Any, instance_type: str, region: str) -> float | None:
    """On-demand Linux USD/hour of ``instance_type`` in ``region``; None if not offered."""
    items = get_products(pricing, instance_price_filters(instance_type, region))
    return parse_instance_price(items, instance_type, region)


def fetch_ebs_gp3_price(pricing: Any, region: str) -> float | None:
    """EBS gp3 USD per GB-month in ``region``, or None."""
    return parse_ebs_gp3_price(get_products(pricing, ebs_gp3_price_filters(region)), region)


def fetch_spot_prices(
    ec2: Any, instance_types: Iterable[str], start: datetime, end: datetime
) -> dict[str, dict[str, float]]:
    """instance type -> zone -> time-weighted median Linux spot price in ``ec2``'s region.

    Reads DescribeSpotPriceHistory from ``start`` to ``end``, every page.
    """
    names = sorted(set(instance_types))
    if not names:
        return {}
    items: list[Mapping[str, Any]] = []
    with aws_errors("read the EC2 spot price history"):
        paginator = ec2.get_paginator("describe_spot_price_history")
        for page in paginator.paginate(**spot_history_params(names, start, end)):
            items.extend(page.get("SpotPriceHistory", []))
    return parse_spot_history(items, ec2.meta.region_name, start, end)


def collect_catalog(
    pricing: Any,
    ec2_clients: Mapping[str, Any],
    *,
    families: Sequence[str] = FAMILIES,
    today: date | None = None,
    spot: bool = True,
    spot_end: datetime | None = None,
) -> dict[str, Any]:
    """Query AWS and assemble the catalog; ``ec2_clients`` maps each region to its client.

    With ``spot``, each type's observed spot prices over the ``SPOT_DAYS`` before
    ``spot_end`` (default: now) are read too.
    """
    regions = tuple(ec2_clients)
    start, end = spot_window(spot_end or datetime.now(timezone.utc))
    facts: dict[str, GpuFacts] = {}
    spot_prices: dict[str, dict[str, float]] = {}
    for region, ec2 in ec2_clients.items():
        found = fetch_gpu_facts(ec2, families)
        log.info("%s: %d GPU instance types", region, len(found))
        for fact in found:
            facts.setdefault(fact.name, fact)
        if spot:
            observed = fetch_spot_prices(ec2, (f.name for f in found), start, end)
            log.info("%s: spot price history for %d of them", region, len(observed))
            for name, zones in observed.items():
                spot_prices.setdefault(name, {}).update(zones)
    prices: dict[str, dict[str, float]] = {}
    for name in sorted(facts):
        for region in regions:
            price = fetch_instance_price(pricing, name, region)
            if price is not None:
                prices.setdefault(name, {})[region] = price
        log.info("%s: %s", name, prices.get(name, "not priced"))
    ebs: dict[str, float] = {}
    for region in regions:
        ebs_price = fetch_ebs_gp3_price(pricing, region)
        if ebs_price is not None:
            ebs[region] = ebs_price
    if spot and not spot_prices:
        log.warning("no spot price history found for any type; the catalog has no spot prices")
    return build_catalog(
        facts.values(),
        prices,
        ebs,
        regions,
        families=families,
        today=today,
        spot=spot_prices,
        spot_observed=(start.date(), end.date()) if spot else None,
    )


# ---------------------------------------------------------------------------------------
# Public price-list files (no credentials)


@contextlib.contextmanager
def open_price_list(
    url: str, region: str, *, timeout: float = PRICE_LIST_TIMEOUT_S
) -> Iterator[Iterator[str]]:
    """The price-list CSV at ``url`` as a stream of text lines, read as they are consumed.

    Download failures, at the start or midway, become a ``CloudError`` naming the region.
    """
    log.info("%s: reading %s", region, url)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(e, urllib.error.HTTPError) and e.code in (403, 404):
            reason = f"HTTP {e.code}"  # a missing file: 404, or 403 where listing is not allowed
        elif isinstance(e, urllib.error.HTTPError):
            raise CloudError(
                f"cannot download the {region} price list {url}: HTTP {e.code}", _PRICE_LIST_HINT
            ) from e
        elif not isinstance(reason, FileNotFoundError):
            raise CloudError(
                f"cannot download the {region} price list {url}: {reason}", _PRICE_LIST_HINT
            ) from e
        raise CloudError(
            f"no public price list for region {region!r} ({url}: {reason})",
            "Check the --regions names (e.g. us-east-1) and the price-list base URL "
            f"(--price-list-url or ${PRICE_LIST_URL_ENV}; default {PRICE_LIST_URL}).",
        ) from e
    with response:
        try:
            yield _whole_lines(response, region, url)
        except (OSError, http.client.HTTPException, UnicodeDecodeError, csv.Error) as e:
            raise CloudError(f"reading the {region} price list {url} failed: {e}", _PRICE_LIST_HINT) from e


def _whole_lines(response: Any, region: str, url: str) -> Iterator[str]:
    """The response's text lines; at the end, an error if it was cut short of its length.

    (``http.client`` reads through ``read1`` stop quietly at a connection closed early: a
    truncated file would otherwise pass for a short price list.)
    """
    yield from io.TextIOWrapper(response, encoding="utf-8-sig", newline="")
    missing = getattr(response, "length", None)
    if isinstance(missing, int) and missing > 0:
        raise CloudError(
            f"reading the {region} price list {url} failed: the download stopped {missing} bytes short",
            _PRICE_LIST_HINT,
        )


def fetch_public_prices(
    region: str, instance_types: Collection[str] | None = None, base_url: str | None = None
) -> PublicPrices:
    """On-demand and gp3 prices of ``region`` from its public price-list file (streamed)."""
    url = price_list_url(region, base_url)
    with open_price_list(url, region) as lines:
        prices = parse_price_list(lines, region, instance_types)
    log.info(
        "%s: %d on-demand prices, gp3 %s (price list %s, published %s)",
        region,
        len(prices.on_demand),
        prices.ebs_gp3,
        prices.info.version,
        prices.info.published.date().isoformat(),
    )
    return prices


def existing_catalog(out: Path) -> tuple[Catalog, str]:
    """The catalog whose GPU facts are kept: ``out`` if it exists, else the packaged one."""
    if not Path(out).exists():
        return load_catalog(), "the packaged catalog"
    try:
        data = json.loads(Path(out).read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            raise ValueError("not a JSON object")
        return parse_catalog(data), str(out)
    except (OSError, ValueError, CloudtrainError) as e:
        raise CloudError(
            f"cannot read the existing catalog {out}: {e}",
            "Its GPU facts are kept by --public-prices: repair it, or remove it to start "
            "from the packaged catalog.",
        ) from e


def collect_public_catalog(
    existing: Catalog,
    regions: Sequence[str],
    *,
    families: Sequence[str] = FAMILIES,
    base_url: str | None = None,
    facts_from: str = "the previous catalog",
) -> dict[str, Any]:
    """The catalog with ``existing``'s GPU facts and the public price lists' prices.

    No spot prices (they need credentials): the result has none, nor ``spot_observed``.
    ``generated`` is the price lists' publication date (the earliest, if they differ).
    """
    facts = facts_from_catalog(existing, families)
    for family in families:
        if not any(f.family == family for f in facts):
            log.warning("%s has no type in %s; run with credentials to add it", family, facts_from)
    log.warning("--public-prices: no spot prices (reading them needs credentials); the catalog has none")
    names = {f.name for f in facts}
    prices: dict[str, dict[str, float]] = {}
    ebs: dict[str, float] = {}
    published: dict[str, date] = {}
    for region in regions:
        found = fetch_public_prices(region, names, base_url)
        published[region] = found.info.published.date()
        for name, price in found.on_demand.items():
            prices.setdefault(name, {})[region] = price
        if found.ebs_gp3 is not None:
            ebs[region] = found.ebs_gp3
    first, last = min(published.values()), max(published.values())
    if first != last:
        log.warning("the price lists were published on different days: %s", published)
    when = first.isoformat() if first == last else f"{first.isoformat()} to {last.isoformat()}"
    source = (
        f"AWS public price-list files (AmazonEC2 offer, published {when}): on-demand Linux, "
        "shared tenancy, USD per hour; EBS gp3 USD per GB-month. GPU facts kept from "
        f"{facts_from} (generated {existing.generated.isoformat()}). No spot prices (they need "
        "credentials). Written by cloudtrain.cloud.catalog_update --public-prices"
    )
    return build_catalog(facts, prices, ebs, regions, families=families, today=first, source=source)


def update_catalog_public(
    out: Path,
    *,
    regions: Sequence[str] = DEFAULT_REGIONS,
    families: Sequence[str] = FAMILIES,
    base_url: str | None = None,
) -> dict[str, Any]:
    """Refresh the prices of the existing catalog from the public price lists; write ``out``."""
    existing, where = existing_catalog(out)
    log.info("GPU facts from %s (generated %s)", where, existing.generated.isoformat())
    data = collect_public_catalog(existing, regions, families=families, base_url=base_url, facts_from=where)
    write_catalog(data, out)
    return data


def make_clients(regions: Sequence[str], profile: str | None = None) -> tuple[Any, dict[str, Any]]:
    """A Pricing client and one EC2 client per region, from ``profile`` or the default chain."""
    with aws_errors("set up the AWS session"):
        session = boto3.Session(profile_name=profile)
        if session.get_credentials() is None:
            raise CredentialsError("no AWS credentials found", _CREDENTIALS_HINT)
        pricing = session.client("pricing", region_name=PRICING_REGION, config=_CONFIG)
        ec2 = {r: session.client("ec2", region_name=r, config=_CONFIG) for r in regions}
    return pricing, ec2


def update_catalog(
    out: Path,
    *,
    regions: Sequence[str] = DEFAULT_REGIONS,
    families: Sequence[str] = FAMILIES,
    profile: str | None = None,
    today: date | None = None,
    spot: bool = True,
) -> dict[str, Any]:
    """Fetch the catalog from AWS and write it atomically to ``out``; return it."""
    pricing, ec2 = make_clients(regions, profile)
    data = collect_catalog(pricing, ec2, families=families, today=today, spot=spot)
    write_catalog(data, out)
    return data


@contextlib.contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """Translate botocore failures into cloudtrain errors that say what to do."""
    try:
        yield
    except CloudtrainError:
        raise
    except _CREDENTIAL_ERRORS as e:
        raise CredentialsError(f"cannot {action}: {e}", _CREDENTIALS_HINT) from e
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in _BAD_CREDENTIAL_CODES:
            raise CredentialsError(
                f"cannot {action}: AWS rejected the credentials ({code})", _CREDENTIALS_HINT
            ) from e
        if code in _ACCESS_DENIED_CODES:
            raise CloudError(
                f"cannot {action}: access denied ({code})",
                "Allow ec2:DescribeInstanceTypes, ec2:DescribeSpotPriceHistory and "
                "pricing:GetProducts for these credentials (--no-spot needs no spot history).",
            ) from e
        raise CloudError(f"cannot {action}: {e}") from e
    except botocore.exceptions.BotoCoreError as e:
        raise CloudError(f"cannot {action}: {e}", "Check the network connection and the region names.") from e


def _utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive datetime is taken to be UTC already."""
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _gib(mib: Any) -> float:
    return round(float(mib) / 1024, 2)


def _number(value: float) -> int | float:
    """Whole numbers as ints in the JSON (``16``, not ``16.0``)."""
    return int(value) if float(value).is_integer() else value


# ---------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloudtrain.cloud.catalog_update",
        description=(
            "Regenerate cloudtrain's GPU instance catalog from AWS (the Pricing API, "
            "DescribeInstanceTypes and the spot price history), or, with --public-prices and "
            "no credentials, refresh its on-demand prices from AWS's public price-list files."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write catalog.json")
    parser.add_argument("--regions", nargs="+", default=list(DEFAULT_REGIONS), metavar="REGION")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY")
    parser.add_argument("--profile", default=None, help="AWS profile (default: the usual chain)")
    parser.add_argument(
        "--no-spot",
        action="store_true",
        help=f"do not read the spot price history (the last {SPOT_DAYS} days' median per zone)",
    )
    parser.add_argument(
        "--public-prices",
        action="store_true",
        help=(
            "no credentials: on-demand and EBS gp3 prices from AWS's public price-list files; "
            "GPU facts kept from the existing catalog (--out, else the packaged one); no spot prices"
        ),
    )
    parser.add_argument(
        "--price-list-url",
        default=None,
        metavar="URL",
        help=(
            f"base URL of the price-list files, {{URL}}/{{region}}/index.csv (with --public-prices; "
            f"default ${PRICE_LIST_URL_ENV}, else {PRICE_LIST_URL})"
        ),
    )
    args = parser.parse_args(argv)
    if args.public_prices and args.profile:
        parser.error("--profile: --public-prices uses no AWS credentials")
    if args.price_list_url and not args.public_prices:
        parser.error("--price-list-url goes with --public-prices")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.public_prices:
            data = update_catalog_public(
                args.out, regions=args.regions, families=args.families, base_url=args.price_list_url
            )
        else:
            data = update_catalog(
                args.out,
                regions=args.regions,
                families=args.families,
                profile=args.profile,
                spot=not args.no_spot,
            )
    except CloudtrainError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return int(e.exit_code)
    window = data.get("spot_observed")
    spot = f"spot prices observed {window['from']} to {window['to']}" if window else "no spot prices"
    print(
        f"wrote {len(data['instance_types'])} instance types in {len(data['regions'])} regions "
        f"to {args.out} (generated {data['generated']}; {spot})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
