"""Regenerate the packaged instance catalog (``cloudtrain/data/catalog.json``) from AWS.

    python -m cloudtrain.cloud.catalog_update --out cloudtrain/data/catalog.json \
        [--regions us-east-1 eu-west-1 ...] [--families g4dn g5 ...] [--profile P]

GPU facts (model, count, memory per GPU, vCPUs, memory) come from EC2
``DescribeInstanceTypes`` in each region; on-demand Linux shared-tenancy prices and
the EBS gp3 GB-month price come from the AWS Price List API (``pricing`` in
us-east-1). It needs credentials allowed ``ec2:DescribeInstanceTypes`` and
``pricing:GetProducts``; it reads, never creates, anything.

The parsing functions (``parse_instance_type``, ``parse_instance_price``,
``parse_ebs_gp3_price``) and the assembly (``build_catalog``) are pure; the
``fetch_*`` functions take boto3 clients, so tests drive them with recorded
responses through ``botocore.stub.Stubber``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped,unused-ignore]
import botocore.exceptions  # type: ignore[import-untyped,unused-ignore]
from botocore.config import Config  # type: ignore[import-untyped,unused-ignore]

from cloudtrain.catalog import SCHEMA, parse_catalog
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
    "The catalog update needs ec2:DescribeInstanceTypes and pricing:GetProducts."
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
) -> dict[str, Any]:
    """The catalog.json document: ``prices`` is instance type -> region -> USD/hour.

    Types without a price in any of ``regions`` are left out (logged). The result is
    checked with ``cloudtrain.catalog.parse_catalog`` before it is returned.
    """
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
    if not entries:
        raise CloudError(
            f"no GPU instance type of {', '.join(families)} has a price in {', '.join(regions)}",
            "Check the --families and --regions names.",
        )
    ebs = {r: float(ebs_gp3[r]) for r in regions if ebs_gp3.get(r)}
    if not ebs:
        raise CloudError(f"no EBS gp3 price found for {', '.join(regions)}")
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "generated": generated.isoformat(),
        "source": (
            "AWS Price List API (AmazonEC2 on-demand, Linux, shared tenancy, USD per hour; "
            "EBS gp3 USD per GB-month) and EC2 DescribeInstanceTypes, fetched "
            f"{generated.isoformat()} by cloudtrain.cloud.catalog_update"
        ),
        "currency": "USD",
        "regions": list(regions),
        "ebs_gp3_per_gb_month": ebs,
        "instance_types": entries,
    }
    parse_catalog(data)  # the same validation the loader applies
    return data


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


def collect_catalog(
    pricing: Any,
    ec2_clients: Mapping[str, Any],
    *,
    families: Sequence[str] = FAMILIES,
    today: date | None = None,
) -> dict[str, Any]:
    """Query AWS and assemble the catalog; ``ec2_clients`` maps each region to its client."""
    regions = tuple(ec2_clients)
    facts: dict[str, GpuFacts] = {}
    for region, ec2 in ec2_clients.items():
        found = fetch_gpu_facts(ec2, families)
        log.info("%s: %d GPU instance types", region, len(found))
        for fact in found:
            facts.setdefault(fact.name, fact)
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
    return build_catalog(facts.values(), prices, ebs, regions, families=families, today=today)


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
) -> dict[str, Any]:
    """Fetch the catalog from AWS and write it atomically to ``out``; return it."""
    pricing, ec2 = make_clients(regions, profile)
    data = collect_catalog(pricing, ec2, families=families, today=today)
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
                "Allow ec2:DescribeInstanceTypes and pricing:GetProducts for these credentials.",
            ) from e
        raise CloudError(f"cannot {action}: {e}") from e
    except botocore.exceptions.BotoCoreError as e:
        raise CloudError(f"cannot {action}: {e}", "Check the network connection and the region names.") from e


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
        description="Regenerate cloudtrain's GPU instance catalog from the AWS Pricing API.",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write catalog.json")
    parser.add_argument("--regions", nargs="+", default=list(DEFAULT_REGIONS), metavar="REGION")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY")
    parser.add_argument("--profile", default=None, help="AWS profile (default: the usual chain)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        data = update_catalog(args.out, regions=args.regions, families=args.families, profile=args.profile)
    except CloudtrainError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return int(e.exit_code)
    print(
        f"wrote {len(data['instance_types'])} instance types in {len(data['regions'])} regions "
        f"to {args.out} (generated {data['generated']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
