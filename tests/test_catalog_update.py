"""The catalog regeneration script (cloudtrain.cloud.catalog_update), offline.

The real boto3 clients are driven with ``botocore.stub.Stubber`` and the responses in
``tests/data/pricing/``. Those files have the exact shape of real responses:
``get_products`` returns each ``PriceList`` entry as a JSON *string*; the
``describe_instance_types`` entries are moto's bundled copies of real
DescribeInstanceTypes output. The prices in them are the list prices of the shipped
catalog, not a live recording. DescribeInstanceTypes is also run against moto.
DescribeSpotPriceHistory responses are built here (``spot_record``), in the shape of the
EC2 API model that the Stubber checks them against.

The public price-list mode reads ``tests/data/price-list/{region}/index.csv``: trimmed
copies of ``https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/
{region}/index.csv``, with the real metadata rows and 91-column header of a published
AmazonEC2 file (2025-09-12); where the shape comes from is in that folder's README.md.
They are served by ``file://`` or a local ``http.server`` on 127.0.0.1; nothing here
reaches AWS or the internet (``no_price_list_download`` points the default elsewhere).
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped,unused-ignore]
import pytest
from botocore.stub import Stubber  # type: ignore[import-untyped,unused-ignore]
from moto import mock_aws

from cloudtrain.catalog import load_catalog, parse_catalog
from cloudtrain.cloud import catalog_update as cu
from cloudtrain.errors import CloudError, CredentialsError

DATA = Path(__file__).parent / "data" / "pricing"
PRICE_LISTS = Path(__file__).parent / "data" / "price-list"
TODAY = date(2025, 5, 1)
REGIONS = ("us-east-1", "eu-west-1")
TYPES = ("g4dn.12xlarge", "g4dn.xlarge", "g5.xlarge", "p5.48xlarge")  # sorted, as queried


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


def price_items(name: str) -> list[str]:
    items: list[str] = fixture(name)["PriceList"]
    return items


def product_params(filters: list[dict[str, str]]) -> dict[str, Any]:
    return {"ServiceCode": "AmazonEC2", "Filters": filters, "FormatVersion": "aws_v1"}


def tm(field: str, value: str) -> dict[str, str]:
    return {"Type": "TERM_MATCH", "Field": field, "Value": value}


def linux_filters(instance_type: str, region: str) -> list[dict[str, str]]:
    """The filters, spelled out independently of the module under test."""
    return [
        tm("instanceType", instance_type),
        tm("regionCode", region),
        tm("operatingSystem", "Linux"),
        tm("tenancy", "Shared"),
        tm("preInstalledSw", "NA"),
        tm("capacitystatus", "Used"),
        tm("licenseModel", "No License required"),
    ]


def ebs_filters(region: str) -> list[dict[str, str]]:
    return [tm("productFamily", "Storage"), tm("volumeApiName", "gp3"), tm("regionCode", region)]


def specs(t: Any) -> tuple[Any, ...]:
    return (t.gpu, t.gpu_count, t.gpu_memory_gib, t.vcpus, t.memory_gib)


@pytest.fixture
def pricing() -> Iterator[tuple[Any, Stubber]]:
    client = boto3.client("pricing", region_name="us-east-1")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def ec2_stub(region: str) -> tuple[Any, Stubber]:
    client = boto3.client("ec2", region_name=region)
    return client, Stubber(client)


ALL_FAMILY_FILTER = {
    "Filters": [
        {
            "Name": "instance-type",
            "Values": ["g4dn.*", "g5.*", "g6.*", "g6e.*", "p3.*", "p3dn.*", "p4d.*", "p5.*"],
        }
    ]
}

UTC = timezone.utc
SPOT_END = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
SPOT_START = SPOT_END - timedelta(days=7)  # 2025-04-24 12:00


def spot_record(instance_type: str, zone: str, price: str, when: datetime) -> dict[str, Any]:
    """One DescribeSpotPriceHistory ``SpotPriceHistory`` entry, as the API returns it."""
    return {
        "AvailabilityZone": zone,
        "InstanceType": instance_type,
        "ProductDescription": "Linux/UNIX",
        "SpotPrice": price,
        "Timestamp": when,
    }


def spot_page(*records: dict[str, Any], next_token: str | None = None) -> dict[str, Any]:
    page: dict[str, Any] = {"SpotPriceHistory": list(records)}
    if next_token:
        page["NextToken"] = next_token
    return page


def spot_params(instance_types: list[str], **extra: str) -> dict[str, Any]:
    """The request, spelled out independently of the module under test."""
    return {
        "InstanceTypes": instance_types,
        "ProductDescriptions": ["Linux/UNIX"],
        "StartTime": SPOT_START,
        "EndTime": SPOT_END,
        **extra,
    }


@pytest.fixture(autouse=True)
def no_price_list_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may download AWS's real price lists: the default base URL goes nowhere."""
    monkeypatch.setenv(cu.PRICE_LIST_URL_ENV, "http://127.0.0.1:9/no-price-lists-in-tests")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# --- request parameters ----------------------------------------------------------------


def test_filters() -> None:
    assert cu.instance_type_filters(["g4dn", "p3dn"]) == [
        {"Name": "instance-type", "Values": ["g4dn.*", "p3dn.*"]}
    ]
    assert cu.instance_price_filters("g5.xlarge", "eu-west-1") == linux_filters("g5.xlarge", "eu-west-1")
    assert cu.ebs_gp3_price_filters("us-east-2") == ebs_filters("us-east-2")


# --- pure parsing ----------------------------------------------------------------------


def test_parse_instance_type_from_real_shape() -> None:
    page = fixture("describe_instance_types_us-east-1_page1.json")
    facts = [cu.parse_instance_type(item) for item in page["InstanceTypes"]]
    assert facts == [
        cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16),
        cu.GpuFacts("g4dn.12xlarge", "g4dn", "T4", 4, 16, 48, 192),
    ]


def test_parse_instance_type_without_a_whole_gpu() -> None:
    assert cu.parse_instance_type({"InstanceType": "m5.large"}) is None
    fractional = {
        "InstanceType": "g6f.large",
        "VCpuInfo": {"DefaultVCpus": 2},
        "MemoryInfo": {"SizeInMiB": 8192},
        "GpuInfo": {"Gpus": [{"Name": "L4", "Count": 0, "MemoryInfo": {"SizeInMiB": 2861}}]},
    }
    assert cu.parse_instance_type(fractional) is None


def test_parse_instance_price() -> None:
    items = price_items("get_products_g4dn.xlarge_us-east-1.json")
    assert isinstance(items[0], str)  # as the API sends them
    # The Reserved term in the same item (0.33138/h) is ignored.
    assert cu.parse_instance_price(items, "g4dn.xlarge", "us-east-1") == 0.526
    assert cu.parse_instance_price(items, "g4dn.xlarge", "eu-west-1") is None
    assert cu.parse_instance_price([], "g4dn.xlarge", "us-east-1") is None


def _variant(item: str, **attributes: str) -> str:
    data = json.loads(item)
    data["product"]["attributes"].update(attributes)
    for term in data["terms"]["OnDemand"].values():
        for dim in term["priceDimensions"].values():
            dim["pricePerUnit"]["USD"] = "9.9990000000"
    return json.dumps(data)


def test_parse_instance_price_skips_other_products() -> None:
    (item,) = price_items("get_products_g4dn.xlarge_us-east-1.json")
    others = [
        _variant(item, operatingSystem="Windows"),
        _variant(item, tenancy="Dedicated"),
        _variant(item, capacitystatus="UnusedCapacityReservation"),
        _variant(item, preInstalledSw="SQL Std"),
        _variant(item, operation="RunInstances:0002"),
        _variant(item, marketoption="CapacityBlock"),
        _variant(item, instanceType="g4dn.2xlarge"),
    ]
    assert cu.parse_instance_price([*others, item], "g4dn.xlarge", "us-east-1") == 0.526
    assert cu.parse_instance_price(others, "g4dn.xlarge", "us-east-1") is None
    # Already-decoded dicts are accepted too.
    assert cu.parse_instance_price([json.loads(item)], "g4dn.xlarge", "us-east-1") == 0.526


def test_parse_instance_price_takes_the_highest_of_several() -> None:
    (item,) = price_items("get_products_g4dn.xlarge_us-east-1.json")
    assert cu.parse_instance_price([item, _variant(item)], "g4dn.xlarge", "us-east-1") == 9.999


def test_parse_ebs_gp3_price() -> None:
    items = price_items("get_products_ebs_gp3_eu-west-1.json")
    assert cu.parse_ebs_gp3_price(items, "eu-west-1") == 0.088
    assert cu.parse_ebs_gp3_price(items, "us-east-1") is None
    # An instance product is not a gp3 volume.
    ec2_items = price_items("get_products_g4dn.xlarge_us-east-1.json")
    assert cu.parse_ebs_gp3_price(ec2_items, "us-east-1") is None


def test_unparseable_price_item() -> None:
    with pytest.raises(json.JSONDecodeError):
        cu.load_price_item("{not json")
    with pytest.raises(CloudError):
        cu.load_price_item("[1, 2]")


# --- build_catalog ---------------------------------------------------------------------


def test_build_catalog_schema_and_order() -> None:
    facts = [
        cu.GpuFacts("p5.48xlarge", "p5", "H100", 8, 80, 192, 2048),
        cu.GpuFacts("g4dn.2xlarge", "g4dn", "T4", 1, 16, 8, 32),
        cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16),
        cu.GpuFacts("g5.xlarge", "g5", "A10G", 1, 22.35, 4, 16),  # unpriced: left out
    ]
    prices = {
        "p5.48xlarge": {"us-east-1": 98.32},
        "g4dn.xlarge": {"us-east-1": 0.526, "eu-west-1": 0.587, "sa-east-1": 0.9},
        "g4dn.2xlarge": {"eu-west-1": 0.838},
    }
    data = cu.build_catalog(facts, prices, {"us-east-1": 0.08}, REGIONS, today=TODAY)
    assert list(data) == [
        "schema",
        "generated",
        "source",
        "currency",
        "regions",
        "ebs_gp3_per_gb_month",
        "cpu_instance_types",
        "instance_types",
    ]
    # doctor --launch's small type, kept from the packaged catalog for the regions asked
    assert [(t["name"], tuple(t["on_demand"])) for t in data["cpu_instance_types"]] == [("t3.micro", REGIONS)]
    assert data["schema"] == 1
    assert data["generated"] == "2025-05-01"
    assert "2025-05-01" in data["source"]
    assert data["regions"] == ["us-east-1", "eu-west-1"]
    assert [t["name"] for t in data["instance_types"]] == [
        "g4dn.xlarge",
        "g4dn.2xlarge",
        "p5.48xlarge",
    ]
    first = data["instance_types"][0]
    assert first == {
        "name": "g4dn.xlarge",
        "family": "g4dn",
        "gpu": "T4",
        "gpu_count": 1,
        "gpu_memory_gib": 16,
        "vcpus": 4,
        "memory_gib": 16,
        "on_demand": {"us-east-1": 0.526, "eu-west-1": 0.587},  # sa-east-1 not asked for
    }
    assert isinstance(first["gpu_memory_gib"], int)
    assert parse_catalog(json.loads(cu.dump_catalog(data))).get("p5.48xlarge") is not None


def test_build_catalog_defaults_to_today() -> None:
    facts = [cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16)]
    prices = {"g4dn.xlarge": {"us-east-1": 0.5}}
    data = cu.build_catalog(facts, prices, {"us-east-1": 0.08}, REGIONS)
    assert data["generated"] == date.today().isoformat()


def test_build_catalog_refuses_empty_results() -> None:
    facts = [cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16)]
    with pytest.raises(CloudError, match="no GPU instance type"):
        cu.build_catalog(facts, {}, {"us-east-1": 0.08}, REGIONS, today=TODAY)
    with pytest.raises(CloudError, match="EBS gp3"):
        cu.build_catalog(facts, {"g4dn.xlarge": {"us-east-1": 0.5}}, {}, REGIONS, today=TODAY)


# --- against the real clients, stubbed -------------------------------------------------


def test_fetch_gpu_facts_follows_pages() -> None:
    ec2, stubber = ec2_stub("us-east-1")
    stubber.add_response(
        "describe_instance_types",
        fixture("describe_instance_types_us-east-1_page1.json"),
        ALL_FAMILY_FILTER,
    )
    stubber.add_response(
        "describe_instance_types",
        fixture("describe_instance_types_us-east-1_page2.json"),
        {**ALL_FAMILY_FILTER, "NextToken": "AAEAAQ-page-2"},
    )
    with stubber:
        facts = cu.fetch_gpu_facts(ec2)
        stubber.assert_no_pending_responses()
    assert [f.name for f in facts] == ["g4dn.xlarge", "g4dn.12xlarge", "g5.xlarge", "p5.48xlarge"]
    p5 = facts[-1]
    assert specs(p5) == ("H100", 8, 80, 192, 2048)


def test_fetch_instance_price_sends_the_filters(pricing: tuple[Any, Stubber]) -> None:
    client, stubber = pricing
    stubber.add_response(
        "get_products",
        fixture("get_products_g5.xlarge_eu-west-1.json"),
        product_params(linux_filters("g5.xlarge", "eu-west-1")),
    )
    assert cu.fetch_instance_price(client, "g5.xlarge", "eu-west-1") == 1.123


def test_fetch_prices_follow_pages(pricing: tuple[Any, Stubber]) -> None:
    client, stubber = pricing
    params = product_params(linux_filters("g5.xlarge", "us-east-1"))
    stubber.add_response(
        "get_products", {"FormatVersion": "aws_v1", "PriceList": [], "NextToken": "t2"}, params
    )
    stubber.add_response(
        "get_products",
        fixture("get_products_g5.xlarge_us-east-1.json"),
        {**params, "NextToken": "t2"},
    )
    assert cu.fetch_instance_price(client, "g5.xlarge", "us-east-1") == 1.006


def test_fetch_ebs_gp3_price(pricing: tuple[Any, Stubber]) -> None:
    client, stubber = pricing
    stubber.add_response(
        "get_products",
        fixture("get_products_ebs_gp3_us-east-1.json"),
        product_params(ebs_filters("us-east-1")),
    )
    assert cu.fetch_ebs_gp3_price(client, "us-east-1") == 0.08


def test_collect_catalog_end_to_end(pricing: tuple[Any, Stubber], tmp_path: Path) -> None:
    client, pstub = pricing
    east, east_stub = ec2_stub("us-east-1")
    west, west_stub = ec2_stub("eu-west-1")
    east_stub.add_response(
        "describe_instance_types",
        fixture("describe_instance_types_us-east-1_page1.json"),
        ALL_FAMILY_FILTER,
    )
    east_stub.add_response(
        "describe_instance_types",
        fixture("describe_instance_types_us-east-1_page2.json"),
        {**ALL_FAMILY_FILTER, "NextToken": "AAEAAQ-page-2"},
    )
    west_stub.add_response(
        "describe_instance_types",
        fixture("describe_instance_types_eu-west-1.json"),
        ALL_FAMILY_FILTER,
    )
    for name in TYPES:
        for region in REGIONS:
            pstub.add_response(
                "get_products",
                fixture(f"get_products_{name}_{region}.json"),
                product_params(linux_filters(name, region)),
            )
    for region in REGIONS:
        pstub.add_response(
            "get_products",
            fixture(f"get_products_ebs_gp3_{region}.json"),
            product_params(ebs_filters(region)),
        )
    # Each region's spot history is read right after its instance types.
    east_stub.add_response(
        "describe_spot_price_history",
        spot_page(
            spot_record("g4dn.xlarge", "us-east-1a", "0.2104", SPOT_START - timedelta(hours=3)),
            spot_record("g4dn.xlarge", "us-east-1b", "0.2300", SPOT_START + timedelta(days=1)),
            spot_record("g5.xlarge", "us-east-1a", "0.4526", SPOT_START + timedelta(hours=1)),
        ),
        spot_params(["g4dn.12xlarge", "g4dn.xlarge", "g5.xlarge", "p5.48xlarge"]),
    )
    west_stub.add_response(
        "describe_spot_price_history",
        spot_page(spot_record("g4dn.xlarge", "eu-west-1c", "0.2467", SPOT_START)),
        spot_params(["g4dn.12xlarge", "g4dn.xlarge", "g5.xlarge"]),
    )
    with east_stub, west_stub:
        data = cu.collect_catalog(
            client, {"us-east-1": east, "eu-west-1": west}, today=TODAY, spot_end=SPOT_END
        )
        east_stub.assert_no_pending_responses()
        west_stub.assert_no_pending_responses()

    out = tmp_path / "catalog.json"
    cu.write_catalog(data, out)
    catalog = parse_catalog(json.loads(out.read_text()))
    assert catalog.generated == TODAY
    assert catalog.regions == REGIONS
    assert catalog.ebs_gp3_per_gb_month == {"us-east-1": 0.08, "eu-west-1": 0.088}
    assert [t.name for t in catalog.instance_types] == [
        "g4dn.xlarge",
        "g4dn.12xlarge",
        "g5.xlarge",
        "p5.48xlarge",
    ]
    g4 = catalog.get("g4dn.12xlarge")
    assert g4 is not None
    assert (g4.gpu, g4.gpu_count, g4.vcpus, g4.memory_gib) == ("T4", 4, 48, 192)
    assert g4.on_demand == {"us-east-1": 3.912, "eu-west-1": 4.362}
    p5 = catalog.get("p5.48xlarge")
    assert p5 is not None
    assert p5.on_demand == {"us-east-1": 98.32}  # not offered in eu-west-1
    # Observed spot prices: per zone, over the window's days; none without history.
    assert catalog.spot_observed == (date(2025, 4, 24), date(2025, 5, 1))
    assert json.loads(out.read_text())["spot_observed"] == {"from": "2025-04-24", "to": "2025-05-01"}
    g4x = catalog.get("g4dn.xlarge")
    assert g4x is not None
    assert g4x.spot == {"eu-west-1c": 0.2467, "us-east-1a": 0.2104, "us-east-1b": 0.23}
    assert g4x.observed_spot("us-east-1") == {"us-east-1a": 0.2104, "us-east-1b": 0.23}
    g5 = catalog.get("g5.xlarge")
    assert g5 is not None and g5.spot == {"us-east-1a": 0.4526}
    assert g4.spot == {} and p5.spot == {}
    assert "spot" not in json.loads(out.read_text())["instance_types"][1]  # g4dn.12xlarge
    assert "DescribeSpotPriceHistory" in catalog.source
    # The fetched facts and prices agree with the shipped catalog.
    shipped = load_catalog()
    for itype in catalog.instance_types:
        ours = shipped.get(itype.name)
        assert ours is not None
        assert specs(itype) == specs(ours), itype.name
        for region, price in itype.on_demand.items():
            assert ours.on_demand_price(region) == price


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error", "hint"),
    [
        ("UnrecognizedClientException", CredentialsError, "aws configure"),
        ("AccessDeniedException", CloudError, "pricing:GetProducts"),
        ("ThrottlingException", CloudError, None),
    ],
)
def test_client_errors_are_translated(
    pricing: tuple[Any, Stubber], code: str, error: type[CloudError], hint: str | None
) -> None:
    client, stubber = pricing
    stubber.add_client_error("get_products", service_error_code=code, service_message="nope")
    with pytest.raises(error) as info:
        cu.fetch_ebs_gp3_price(client, "us-east-1")
    assert type(info.value) is error
    assert code in info.value.message or "nope" in info.value.message
    if hint:
        assert info.value.hint and hint in info.value.hint


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for var in (
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.usefixtures("no_credentials")
def test_no_credentials() -> None:
    with pytest.raises(CredentialsError) as info:
        cu.make_clients(["us-east-1"])
    assert info.value.hint and "--profile" in info.value.hint


def test_unknown_profile() -> None:
    with pytest.raises(CredentialsError, match="nosuchprofile"):
        cu.make_clients(["us-east-1"], profile="nosuchprofile")


@pytest.mark.usefixtures("no_credentials")
def test_main_without_credentials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "catalog.json"
    assert cu.main(["--out", str(out), "--regions", "us-east-1"]) == 3
    err = capsys.readouterr().err
    assert "no AWS credentials" in err
    assert "hint:" in err
    assert not out.exists()


def test_update_catalog_writes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """update_catalog = make_clients + collect_catalog + write_catalog."""
    seen: dict[str, Any] = {}

    def fake_collect(pricing: Any, ec2: Any, *, families: Any, today: Any, spot: bool) -> dict[str, Any]:
        seen.update(pricing=pricing, regions=list(ec2), families=families, spot=spot)
        facts = [cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16)]
        return cu.build_catalog(
            facts, {"g4dn.xlarge": {"us-east-2": 0.526}}, {"us-east-2": 0.08}, ["us-east-2"]
        )

    monkeypatch.setattr(cu, "collect_catalog", fake_collect)
    out = tmp_path / "sub" / "catalog.json"
    data = cu.update_catalog(out, regions=["us-east-2"], families=["g4dn"])
    assert seen["regions"] == ["us-east-2"]
    assert seen["families"] == ["g4dn"]
    assert seen["spot"] is True  # on by default with credentials
    assert seen["pricing"].meta.region_name == "us-east-1"
    assert json.loads(out.read_text()) == data


# --- atomic write ----------------------------------------------------------------------


def test_write_catalog_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "catalog.json"
    out.write_text("old")
    with pytest.raises(TypeError):
        cu.write_catalog({"bad": object()}, out)
    assert out.read_text() == "old"
    assert os.listdir(tmp_path) == ["catalog.json"]
    cu.write_catalog({"schema": 1}, out)
    assert out.read_text() == '{\n  "schema": 1\n}\n'
    assert os.listdir(tmp_path) == ["catalog.json"]


def test_shipped_file_has_the_writer_layout() -> None:
    """Regenerating rewrites the shipped file in the same layout (clean diffs)."""
    path = Path(cu.__file__).parent.parent / "data" / "catalog.json"
    text = path.read_text()
    assert cu.dump_catalog(json.loads(text)) == text


# --- DescribeInstanceTypes against moto ------------------------------------------------


def test_fetch_gpu_facts_against_moto() -> None:
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        facts = {f.name: f for f in cu.fetch_gpu_facts(ec2, ("g4dn", "g5"))}
    expected = {f"g4dn.{s}" for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge")} | {
        f"g5.{s}" for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge")
    }
    assert expected <= set(facts)
    assert {f.family for f in facts.values()} == {"g4dn", "g5"}  # no g5g from "g5.*"
    assert facts["g4dn.12xlarge"].gpu_count == 4
    assert facts["g5.48xlarge"].gpu_count == 8
    shipped = load_catalog()
    for fact in facts.values():
        ours = shipped.get(fact.name)
        assert ours is not None, fact.name
        assert specs(fact) == specs(ours), fact.name


# --- observed spot prices: the time-weighted median ------------------------------------


def at(days: float = 0, hours: float = 0) -> datetime:
    """A moment in the spot window (SPOT_START + days + hours)."""
    return SPOT_START + timedelta(days=days, hours=hours)


def test_spot_window_and_request() -> None:
    assert cu.spot_window(SPOT_END) == (SPOT_START, SPOT_END)
    assert cu.spot_window(datetime(2025, 5, 1, 12, 0)) == (SPOT_START, SPOT_END)  # naive: UTC
    params = cu.spot_history_params(["g5.xlarge", "g4dn.xlarge"], SPOT_START, SPOT_END)
    assert params == spot_params(["g4dn.xlarge", "g5.xlarge"])


def test_median_is_weighted_by_time_held() -> None:
    """A price that held 6 days beats three short spikes, though they are most records."""
    records = [
        (at(0), 0.16),  # 6 days
        (at(6), 0.90),  # 2 hours
        (at(6, 2), 0.85),  # 2 hours
        (at(6, 4), 0.95),  # 2 hours
        (at(6, 6), 0.20),  # the last 18 hours
    ]
    assert sorted(p for _, p in records)[len(records) // 2] == 0.85  # the records' plain median
    assert cu.time_weighted_median(records, SPOT_START, SPOT_END) == 0.16
    assert cu.time_weighted_median(reversed(records), SPOT_START, SPOT_END) == 0.16  # any order


def test_median_counts_the_record_in_effect_at_the_start() -> None:
    """AWS returns the price in effect at StartTime with an older timestamp: it holds from the start."""
    records = [(at(-2), 0.50), (at(-1), 0.20), (at(4), 0.40)]
    # 0.50 was replaced before the window; 0.20 holds days 0-4, 0.40 days 4-7.
    assert cu.time_weighted_median(records, SPOT_START, SPOT_END) == 0.20
    assert cu.time_weighted_median([(at(-30), 0.31)], SPOT_START, SPOT_END) == 0.31


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], None),
        ([(at(8), 0.3)], None),  # after the window
        ([(SPOT_END, 0.3)], None),  # at its very end: held no time
        ([(at(6), 0.3)], 0.3),  # the time before the first record is unknown, not counted
        ([(at(0), 0.1), (at(8), 9.0)], 0.1),  # a record after the end changes nothing
        ([(at(0), 0.1), (at(3.5), 0.3)], 0.2),  # half the time each: the mean of the two
        ([(at(0), 0.1), (at(3), 0.3), (at(3), 0.5)], 0.5),  # same moment: the later record
    ],
)
def test_median_edges(records: list[tuple[datetime, float]], expected: float | None) -> None:
    assert cu.time_weighted_median(records, SPOT_START, SPOT_END) == expected


def test_parse_spot_history_per_type_and_zone() -> None:
    items = [
        spot_record("g4dn.xlarge", "us-east-1a", "0.1578", at(-1)),
        spot_record("g4dn.xlarge", "us-east-1a", "0.9000", at(6, 23)),  # a spike of an hour
        spot_record("g4dn.xlarge", "us-east-1b", "0.171249", at(0)),  # rounded to 4 decimals
        spot_record("g5.xlarge", "us-east-1f", "0.4123", "2025-04-25T00:00:00Z"),  # type: ignore[arg-type]
        {**spot_record("g4dn.xlarge", "us-east-1c", "0.7", at(0)), "ProductDescription": "Windows"},
        spot_record("g4dn.xlarge", "us-east-1-bos-1a", "0.3", at(0)),  # a Local Zone
        spot_record("g4dn.xlarge", "us-west-2a", "0.3", at(0)),  # another region
    ]
    assert cu.parse_spot_history(items, "us-east-1", SPOT_START, SPOT_END) == {
        "g4dn.xlarge": {"us-east-1a": 0.1578, "us-east-1b": 0.1712},
        "g5.xlarge": {"us-east-1f": 0.4123},
    }
    assert cu.parse_spot_history([], "us-east-1", SPOT_START, SPOT_END) == {}
    with pytest.raises(CloudError, match="DescribeSpotPriceHistory"):
        cu.parse_spot_history([{"AvailabilityZone": "us-east-1a"}], "us-east-1", SPOT_START, SPOT_END)


def test_fetch_spot_prices_follows_pages() -> None:
    ec2, stubber = ec2_stub("us-east-1")
    names = ["g4dn.xlarge", "g5.xlarge", "p5.48xlarge"]
    stubber.add_response(
        "describe_spot_price_history",
        spot_page(  # newest first, as AWS sends them
            spot_record("g4dn.xlarge", "us-east-1a", "0.6100", at(6, 20)),
            spot_record("g4dn.xlarge", "us-east-1b", "0.1650", at(2)),
            spot_record("g5.xlarge", "us-east-1c", "0.3921", at(1)),
            next_token="page-2",
        ),
        spot_params(names),
    )
    stubber.add_response(
        "describe_spot_price_history",
        spot_page(
            spot_record("g4dn.xlarge", "us-east-1a", "0.1578", at(-0.5)),
            spot_record("g4dn.xlarge", "us-east-1b", "0.1702", at(-3)),
        ),
        spot_params(names, NextToken="page-2"),
    )
    with stubber:
        observed = cu.fetch_spot_prices(ec2, reversed(names), SPOT_START, SPOT_END)
        stubber.assert_no_pending_responses()
    assert observed == {
        "g4dn.xlarge": {"us-east-1a": 0.1578, "us-east-1b": 0.1650},  # 1b: 0.1702 for 2 days only
        "g5.xlarge": {"us-east-1c": 0.3921},
    }  # p5.48xlarge: no history, no entry


def test_fetch_spot_prices_asks_nothing_without_types() -> None:
    ec2, stubber = ec2_stub("us-east-1")
    with stubber:
        assert cu.fetch_spot_prices(ec2, [], SPOT_START, SPOT_END) == {}


def test_spot_history_access_denied() -> None:
    ec2, stubber = ec2_stub("us-east-1")
    stubber.add_client_error("describe_spot_price_history", service_error_code="UnauthorizedOperation")
    with stubber, pytest.raises(CloudError) as info:
        cu.fetch_spot_prices(ec2, ["g4dn.xlarge"], SPOT_START, SPOT_END)
    assert "spot price history" in info.value.message
    assert info.value.hint and "ec2:DescribeSpotPriceHistory" in info.value.hint


def test_build_catalog_with_spot() -> None:
    facts = [
        cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16),
        cu.GpuFacts("g5.xlarge", "g5", "A10G", 1, 22.35, 4, 16),
    ]
    prices = {"g4dn.xlarge": {"us-east-1": 0.526}, "g5.xlarge": {"us-east-1": 1.006}}
    spot = {"g4dn.xlarge": {"us-east-1b": 0.17, "us-east-1a": 0.15781, "sa-east-1a": 0.3}}
    window = (date(2025, 4, 24), date(2025, 5, 1))
    data = cu.build_catalog(
        facts, prices, {"us-east-1": 0.08}, REGIONS, today=TODAY, spot=spot, spot_observed=window
    )
    assert list(data) == [
        "schema",
        "generated",
        "source",
        "currency",
        "regions",
        "ebs_gp3_per_gb_month",
        "spot_observed",
        "cpu_instance_types",
        "instance_types",
    ]
    assert data["spot_observed"] == {"from": "2025-04-24", "to": "2025-05-01"}
    g4, g5 = data["instance_types"]
    assert g4["spot"] == {"us-east-1a": 0.1578, "us-east-1b": 0.17}  # sa-east-1 not in the catalog
    assert list(g4)[-1] == "spot"
    assert "spot" not in g5
    assert "2025-04-24 to 2025-05-01" in data["source"]
    assert parse_catalog(data).spot_observed == window
    # No type with a spot price: no spot_observed either.
    bare = cu.build_catalog(facts, prices, {"us-east-1": 0.08}, REGIONS, today=TODAY, spot_observed=window)
    assert "spot_observed" not in bare
    with pytest.raises(ValueError, match="spot_observed"):
        cu.build_catalog(facts, prices, {"us-east-1": 0.08}, REGIONS, today=TODAY, spot=spot)


def test_collect_catalog_without_spot(pricing: tuple[Any, Stubber]) -> None:
    client, pstub = pricing
    east, east_stub = ec2_stub("us-east-1")
    east_stub.add_response(
        "describe_instance_types",
        fixture("describe_instance_types_us-east-1_page2.json"),
        {"Filters": [{"Name": "instance-type", "Values": ["g5.*", "p5.*"]}]},
    )
    for name in ("g5.xlarge", "p5.48xlarge"):
        pstub.add_response(
            "get_products",
            fixture(f"get_products_{name}_us-east-1.json"),
            product_params(linux_filters(name, "us-east-1")),
        )
    pstub.add_response(
        "get_products",
        fixture("get_products_ebs_gp3_us-east-1.json"),
        product_params(ebs_filters("us-east-1")),
    )
    with east_stub:  # no describe_spot_price_history stubbed: a call would fail
        data = cu.collect_catalog(client, {"us-east-1": east}, families=("g5", "p5"), today=TODAY, spot=False)
        east_stub.assert_no_pending_responses()
    assert "spot_observed" not in data
    assert all("spot" not in entry for entry in data["instance_types"])
    assert "DescribeSpotPriceHistory" not in data["source"]


@pytest.mark.parametrize(("flags", "spot"), [([], True), (["--no-spot"], False)])
def test_main_spot_flag(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    spot: bool,
) -> None:
    seen: dict[str, Any] = {}

    def fake_update(out: Path, **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        facts = [cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16)]
        return cu.build_catalog(
            facts, {"g4dn.xlarge": {"us-east-1": 0.5}}, {"us-east-1": 0.08}, ["us-east-1"]
        )

    monkeypatch.setattr(cu, "update_catalog", fake_update)
    assert cu.main(["--out", str(tmp_path / "c.json"), *flags]) == 0
    assert seen["spot"] is spot
    assert "no spot prices" in capsys.readouterr().out


# --- public price-list files: parsing ----------------------------------------------------

# The rows (RateCode: SKU, on-demand term, price dimension) of the us-east-1 fixture that
# are prices: g4dn.xlarge, g4dn.12xlarge, g5.xlarge (on-demand Linux) and gp3 storage.
# Every other row is a decoy (the Reserved row of g4dn.xlarge has its SKU, another term).
WANTED_RATES = {
    f"{sku}.JRTCKXETXF.6YS6EN2CT7"
    for sku in ("HCD89PJGZFYQJS7B", "95W238ANJTMJ8CK6", "MBRS4NA7CG9TAQVY", "3BUAF9V7C3P83VH2")
}
PUBLISHED = datetime(2025, 9, 12, 22, 53, 8, tzinfo=UTC)


def price_list_lines(region: str) -> Iterator[str]:
    """A fixture file, a line at a time: a one-pass iterator, never the whole text."""
    with open(PRICE_LISTS / region / "index.csv", encoding="utf-8", newline="") as f:
        yield from f


def test_parse_price_list_streams_the_fixture() -> None:
    read = 0

    def counted() -> Iterator[str]:
        nonlocal read
        for line in price_list_lines("us-east-1"):
            read += 1
            yield line

    prices = cu.parse_price_list(
        counted(), "us-east-1", {"g4dn.xlarge", "g4dn.12xlarge", "g5.xlarge", "p5.48xlarge"}
    )
    assert prices.region == "us-east-1"
    assert prices.on_demand == {"g4dn.12xlarge": 3.912, "g4dn.xlarge": 0.526, "g5.xlarge": 1.006}
    assert prices.ebs_gp3 == 0.08
    assert prices.info == cu.PriceListInfo("AmazonEC2", "20250912225308", PUBLISHED, "v1.0")
    assert read == len((PRICE_LISTS / "us-east-1" / "index.csv").read_text().splitlines())

    west = cu.parse_price_list(price_list_lines("eu-west-1"), "eu-west-1")  # all types
    assert west.on_demand == {"g4dn.12xlarge": 4.362, "g4dn.xlarge": 0.587, "g5.xlarge": 1.123}
    assert west.ebs_gp3 == 0.088
    only = cu.parse_price_list(price_list_lines("us-east-1"), "us-east-1", ["g5.xlarge"])
    assert only.on_demand == {"g5.xlarge": 1.006}


def test_parse_price_list_skips_every_decoy() -> None:
    """Each row alone: the Reserved, Windows, RHEL, Dedicated, capacity-reservation, SQL,
    other-region, gp2 and Tokyo rows price nothing; the four wanted rows do."""
    lines = list(price_list_lines("us-east-1"))
    preamble, rows = lines[:6], lines[6:]
    assert len(rows) >= 13
    statuses = set()
    for line in rows:
        (row,) = csv.reader([line])
        statuses.add(row[preamble[5].split(",").index('"CapacityStatus"')])
        found = cu.parse_price_list([*preamble, line], "us-east-1")
        priced = bool(found.on_demand) or found.ebs_gp3 is not None
        assert priced == (row[2] in WANTED_RATES), line[:160]
    assert {"Used", "AllocatedCapacityReservation", "UnusedCapacityReservation"} <= statuses


def test_parse_price_list_takes_the_highest_of_several(caplog: pytest.LogCaptureFixture) -> None:
    lines = list(price_list_lines("us-east-1"))
    (g4,) = [line for line in lines if line.startswith('"HCD89PJGZFYQJS7B","JRTCKXETXF"')]
    dearer = g4.replace('"0.5260000000"', '"0.6000000000"').replace("HCD89PJGZFYQJS7B", "ZZZZ9PJGZFYQJS7B")
    with caplog.at_level(logging.WARNING):
        prices = cu.parse_price_list([*lines, dearer], "us-east-1", ["g4dn.xlarge"])
    assert prices.on_demand == {"g4dn.xlarge": 0.6}
    assert "several on-demand prices" in caplog.text


def _fixture_text() -> str:
    return (PRICE_LISTS / "us-east-1" / "index.csv").read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not an AWS price-list CSV"),
        ("<html><body><h1>Access Denied</h1></body></html>\n" * 50, "not an AWS price-list CSV"),
        (_fixture_text().replace('"OfferCode","AmazonEC2"', '"OfferCode","AmazonRDS"'), "'AmazonRDS'"),
        (_fixture_text().replace('"Publication Date","2025-09-12T22:53:08Z"\n', ""), "Publication Date"),
        (_fixture_text().replace('"CapacityStatus",', '"Capacity",', 1), "no column 'CapacityStatus'"),
        (_fixture_text().replace('"0.5260000000"', '"0.526 USD"'), "bad price '0.526 USD' on line 7"),
    ],
)
def test_parse_price_list_refuses_other_files(text: str, message: str) -> None:
    with pytest.raises(CloudError, match=message) as info:
        cu.parse_price_list(iter(text.splitlines(keepends=True)), "us-east-1")
    assert "us-east-1" in info.value.message


def test_price_list_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cu.PRICE_LIST_URL_ENV)
    assert cu.price_list_url("eu-west-1") == (
        "https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/eu-west-1/index.csv"
    )
    monkeypatch.setenv(cu.PRICE_LIST_URL_ENV, "http://mirror.example/ec2/")
    assert cu.price_list_url("eu-west-1") == "http://mirror.example/ec2/eu-west-1/index.csv"
    assert cu.price_list_url("eu-west-1", "file:///srv/pl") == "file:///srv/pl/eu-west-1/index.csv"


def test_facts_from_catalog() -> None:
    shipped = load_catalog()
    facts = cu.facts_from_catalog(shipped, ("p5",))
    assert [f.name for f in facts] == ["p5.48xlarge"]
    assert specs(facts[0]) == specs(shipped.get("p5.48xlarge"))


# --- public price-list files: download and the --public-prices mode ---------------------


@pytest.fixture
def price_list_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A local http.server serving the fixtures at the real path: (base URL, paths asked)."""
    root = tmp_path / "srv"
    base_path = "offers/v1.0/aws/AmazonEC2/current"
    for region_dir in PRICE_LISTS.iterdir():
        if region_dir.is_dir():
            (root / base_path / region_dir.name).mkdir(parents=True)
            (root / base_path / region_dir.name / "index.csv").write_bytes(
                (region_dir / "index.csv").read_bytes()
            )
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{base_path}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _no_aws(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("--public-prices must not touch AWS")


@pytest.mark.usefixtures("no_credentials")
def test_main_public_prices_end_to_end(
    price_list_server: tuple[str, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, asked = price_list_server
    monkeypatch.setattr(boto3, "Session", _no_aws)
    out = tmp_path / "catalog.json"  # absent: the GPU facts come from the packaged catalog
    argv = ["--out", str(out), "--public-prices", "--price-list-url", base]
    argv += ["--regions", "us-east-1", "eu-west-1", "--families", "g4dn", "g5"]
    with caplog.at_level(logging.WARNING):
        assert cu.main(argv) == 0
    assert asked == [
        "/offers/v1.0/aws/AmazonEC2/current/us-east-1/index.csv",
        "/offers/v1.0/aws/AmazonEC2/current/eu-west-1/index.csv",
    ]
    data = json.loads(out.read_text())
    catalog = parse_catalog(data)
    assert catalog.generated == date(2025, 9, 12)  # the price list's publication date
    assert catalog.source.startswith("AWS public price-list files (AmazonEC2 offer, published 2025-09-12)")
    assert "packaged catalog" in catalog.source
    assert catalog.regions == ("us-east-1", "eu-west-1")
    assert catalog.ebs_gp3_per_gb_month == {"us-east-1": 0.08, "eu-west-1": 0.088}
    assert [t.name for t in catalog.instance_types] == ["g4dn.xlarge", "g4dn.12xlarge", "g5.xlarge"]
    shipped = load_catalog()
    for itype in catalog.instance_types:
        ours = shipped.get(itype.name)
        assert ours is not None
        assert specs(itype) == specs(ours)  # the facts are kept
        assert dict(itype.on_demand) == {r: ours.on_demand[r] for r in ("us-east-1", "eu-west-1")}
        assert itype.spot == {}
    assert "spot_observed" not in data and catalog.spot_observed is None
    assert "no spot prices" in caplog.text
    printed = capsys.readouterr().out
    assert "wrote 3 instance types in 2 regions" in printed and "no spot prices" in printed


def test_main_public_prices_keeps_the_out_files_facts(
    price_list_server: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing --out is the facts' source (the base URL from the environment); its old
    prices and its spot prices go."""
    base, _ = price_list_server
    monkeypatch.setenv(cu.PRICE_LIST_URL_ENV, base)
    out = tmp_path / "catalog.json"
    old = cu.build_catalog(
        [cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16)],
        {"g4dn.xlarge": {"us-east-1": 0.5}},
        {"us-east-1": 0.07},
        ["us-east-1"],
        today=TODAY,
        spot={"g4dn.xlarge": {"us-east-1a": 0.2}},
        spot_observed=(date(2025, 4, 24), date(2025, 5, 1)),
    )
    cu.write_catalog(old, out)
    assert cu.main(["--out", str(out), "--public-prices", "--regions", "us-east-1"]) == 0
    data = json.loads(out.read_text())
    catalog = parse_catalog(data)
    assert [t.name for t in catalog.instance_types] == ["g4dn.xlarge"]
    assert catalog.instance_types[0].on_demand == {"us-east-1": 0.526}
    assert catalog.instance_types[0].spot == {}
    assert "spot_observed" not in data
    assert str(out) in catalog.source and "generated 2025-05-01" in catalog.source


def test_main_public_prices_missing_region(
    price_list_server: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = price_list_server
    out = tmp_path / "catalog.json"
    argv = [
        "--out",
        str(out),
        "--public-prices",
        "--price-list-url",
        base,
        "--regions",
        "us-east-1",
        "us-west-2",
    ]
    assert cu.main(argv) == 3
    err = capsys.readouterr().err
    assert "error: no public price list for region 'us-west-2'" in err
    assert "HTTP 404" in err and "us-west-2/index.csv" in err
    assert "hint: Check the --regions names" in err
    assert not out.exists()


def test_main_public_prices_damaged_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "catalog.json"
    out.write_text("{")
    assert cu.main(["--out", str(out), "--public-prices", "--price-list-url", PRICE_LISTS.as_uri()]) == 3
    assert "cannot read the existing catalog" in capsys.readouterr().err
    assert out.read_text() == "{"


@pytest.mark.parametrize(
    "argv",
    [
        ["--public-prices", "--profile", "work"],
        ["--price-list-url", "http://127.0.0.1:9/"],
    ],
)
def test_main_public_prices_usage_errors(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cu.main(["--out", str(tmp_path / "c.json"), *argv])
    assert info.value.code == 2


def test_fetch_public_prices_from_a_file_url() -> None:
    prices = cu.fetch_public_prices("eu-west-1", {"g5.xlarge"}, PRICE_LISTS.as_uri())
    assert prices.on_demand == {"g5.xlarge": 1.123}
    assert prices.info.published == PUBLISHED
    with pytest.raises(CloudError, match="no public price list for region 'ap-south-1'"):
        cu.fetch_public_prices("ap-south-1", None, PRICE_LISTS.as_uri())


def test_download_cut_short_is_an_error() -> None:
    """A download that ends before its Content-Length is not a short price list."""
    body = (PRICE_LISTS / "us-east-1" / "index.csv").read_bytes()

    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/csv")
            self.send_header("Content-Length", str(2 * len(body)))
            self.end_headers()
            self.wfile.write(body)  # then the connection closes (HTTP/1.0)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(CloudError, match="reading the us-east-1 price list .* failed") as info:
            cu.fetch_public_prices("us-east-1", None, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert "bytes short" in info.value.message
    assert info.value.hint and "--price-list-url" in info.value.hint
