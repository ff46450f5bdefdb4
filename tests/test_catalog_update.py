"""The catalog regeneration script (cloudtrain.cloud.catalog_update), offline.

The real boto3 clients are driven with ``botocore.stub.Stubber`` and the responses in
``tests/data/pricing/``. Those files have the exact shape of real responses:
``get_products`` returns each ``PriceList`` entry as a JSON *string*; the
``describe_instance_types`` entries are moto's bundled copies of real
DescribeInstanceTypes output. The prices in them are the list prices of the shipped
catalog, not a live recording. DescribeInstanceTypes is also run against moto.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import date
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
        "instance_types",
    ]
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
    with east_stub, west_stub:
        data = cu.collect_catalog(client, {"us-east-1": east, "eu-west-1": west}, today=TODAY)
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

    def fake_collect(pricing: Any, ec2: Any, *, families: Any, today: Any) -> dict[str, Any]:
        seen.update(pricing=pricing, regions=list(ec2), families=families)
        facts = [cu.GpuFacts("g4dn.xlarge", "g4dn", "T4", 1, 16, 4, 16)]
        return cu.build_catalog(
            facts, {"g4dn.xlarge": {"us-east-2": 0.526}}, {"us-east-2": 0.08}, ["us-east-2"]
        )

    monkeypatch.setattr(cu, "collect_catalog", fake_collect)
    out = tmp_path / "sub" / "catalog.json"
    data = cu.update_catalog(out, regions=["us-east-2"], families=["g4dn"])
    assert seen["regions"] == ["us-east-2"]
    assert seen["families"] == ["g4dn"]
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
