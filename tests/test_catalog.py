"""The shipped instance catalog and its loader/validator (cloudtrain.catalog)."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import replace
from datetime import date
from importlib import resources
from typing import Any

import pytest

from cloudtrain.catalog import Catalog, InstanceType, load_catalog, parse_catalog
from cloudtrain.errors import CloudtrainError

REGIONS = ("us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1")

# Every size of each family, and the GPU each family has.
G_SIZES = (
    "xlarge",
    "2xlarge",
    "4xlarge",
    "8xlarge",
    "12xlarge",
    "16xlarge",
    "24xlarge",
    "48xlarge",
)
SIZES = {
    "g4dn": ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "metal"),
    "g5": G_SIZES,
    "g6": G_SIZES,
    "g6e": G_SIZES,
    "p3": ("2xlarge", "8xlarge", "16xlarge"),
    "p3dn": ("24xlarge",),
    "p4d": ("24xlarge",),
    "p5": ("48xlarge",),
}
FAMILY_GPU = {
    "g4dn": "T4",
    "g5": "A10G",
    "g6": "L4",
    "g6e": "L40S",
    "p3": "V100",
    "p3dn": "V100",
    "p4d": "A100",
    "p5": "H100",
}
# GPUs per size, where it is not 1.
MULTI_GPU = {
    "g4dn.12xlarge": 4,
    "g4dn.metal": 8,
    "g5.12xlarge": 4,
    "g5.24xlarge": 4,
    "g5.48xlarge": 8,
    "g6.12xlarge": 4,
    "g6.24xlarge": 4,
    "g6.48xlarge": 8,
    "g6e.12xlarge": 4,
    "g6e.24xlarge": 4,
    "g6e.48xlarge": 8,
    "p3.8xlarge": 4,
    "p3.16xlarge": 8,
    "p3dn.24xlarge": 8,
    "p4d.24xlarge": 8,
    "p5.48xlarge": 8,
}
VCPUS = {"xlarge": 4, "2xlarge": 8, "4xlarge": 16, "8xlarge": 32, "12xlarge": 48, "16xlarge": 64,
         "24xlarge": 96, "48xlarge": 192, "metal": 96}  # fmt: skip


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def raw_catalog() -> dict[str, Any]:
    text = resources.files("cloudtrain").joinpath("data/catalog.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


# --- the shipped file ------------------------------------------------------------------


def test_shipped_catalog_is_dated_and_sourced(catalog: Catalog) -> None:
    assert isinstance(catalog.generated, date)
    assert date(2024, 1, 1) <= catalog.generated <= date.today()
    assert catalog.generated.isoformat() in catalog.source
    assert "cloudtrain.cloud.catalog_update" in catalog.source
    assert catalog.regions == REGIONS
    assert raw_catalog()["currency"] == "USD"


def test_every_size_of_every_family_is_present(catalog: Catalog) -> None:
    expected = {f"{family}.{size}" for family, sizes in SIZES.items() for size in sizes}
    names = [t.name for t in catalog.instance_types]
    assert len(names) == len(set(names))
    assert expected <= set(names)
    assert {t.family for t in catalog.instance_types} >= set(SIZES)


def test_gpu_facts_are_consistent(catalog: Catalog) -> None:
    for itype in catalog.instance_types:
        family, size = itype.name.split(".")
        assert itype.family == family
        assert itype.gpu == FAMILY_GPU[family], itype.name
        assert itype.gpu_count == MULTI_GPU.get(itype.name, 1), itype.name
        assert itype.vcpus == VCPUS[size], itype.name
        assert itype.vcpus >= 4 * itype.gpu_count
        assert itype.memory_gib >= 2 * itype.vcpus, itype.name
        assert itype.gpu_memory_gib > 0


@pytest.mark.parametrize(
    ("name", "gpu", "count", "gpu_memory", "vcpus", "memory"),
    [
        ("g4dn.xlarge", "T4", 1, 16, 4, 16),
        ("g4dn.12xlarge", "T4", 4, 16, 48, 192),
        ("g4dn.metal", "T4", 8, 16, 96, 384),
        ("g5.xlarge", "A10G", 1, 22.35, 4, 16),
        ("g5.48xlarge", "A10G", 8, 22.35, 192, 768),
        ("g6.xlarge", "L4", 1, 22.35, 4, 16),
        ("g6e.xlarge", "L40S", 1, 44.7, 4, 32),
        ("p3.2xlarge", "V100", 1, 16, 8, 61),
        ("p3.16xlarge", "V100", 8, 16, 64, 488),
        ("p3dn.24xlarge", "V100", 8, 32, 96, 768),
        ("p4d.24xlarge", "A100", 8, 40, 96, 1152),
        ("p5.48xlarge", "H100", 8, 80, 192, 2048),
    ],
)
def test_spot_checks(
    catalog: Catalog, name: str, gpu: str, count: int, gpu_memory: float, vcpus: int, memory: float
) -> None:
    itype = catalog.get(name)
    assert itype is not None
    assert (itype.gpu, itype.gpu_count, itype.gpu_memory_gib, itype.vcpus, itype.memory_gib) == (
        gpu,
        count,
        gpu_memory,
        vcpus,
        memory,
    )


def test_prices_are_positive_and_cover_us_east_1(catalog: Catalog) -> None:
    for itype in catalog.instance_types:
        assert itype.on_demand_price("us-east-1") is not None, itype.name
        assert set(itype.on_demand) <= set(catalog.regions)
        for region, price in itype.on_demand.items():
            assert 0 < price < 200, (itype.name, region)
    for region in catalog.regions:
        assert 0 < catalog.ebs_price(region) < 1


@pytest.mark.parametrize(
    ("name", "price"),
    [("g4dn.xlarge", 0.526), ("g5.xlarge", 1.006), ("p3.2xlarge", 3.06), ("g6.xlarge", 0.8048)],
)
def test_known_us_east_1_prices(catalog: Catalog, name: str, price: float) -> None:
    itype = catalog.get(name)
    assert itype is not None
    assert itype.on_demand_price("us-east-1") == price


def test_prices_grow_with_size_within_a_single_gpu_line(catalog: Catalog) -> None:
    """Within a family, a bigger single-GPU size never costs less (catches typos)."""
    for family in SIZES:
        singles = sorted(
            (t for t in catalog.instance_types if t.family == family and t.gpu_count == 1),
            key=lambda t: t.vcpus,
        )
        for region in REGIONS:
            prices = [t.on_demand_price(region) for t in singles]
            known = [p for p in prices if p is not None]
            assert known == sorted(known), (family, region)


def test_not_offered_regions_are_omitted(catalog: Catalog) -> None:
    p5 = catalog.get("p5.48xlarge")
    assert p5 is not None
    assert p5.on_demand_price("eu-west-1") is None
    g6 = catalog.get("g6.xlarge")
    assert g6 is not None
    assert g6.on_demand_price("eu-west-1") is None


# --- the API ---------------------------------------------------------------------------


def test_get(catalog: Catalog) -> None:
    assert catalog.get("g4dn.xlarge") is not None
    assert catalog.get("G4DN.XLARGE") is None
    assert catalog.get("t3.micro") is None


def test_gpu_names(catalog: Catalog) -> None:
    assert catalog.gpu_names() == ("A100", "A10G", "H100", "L4", "L40S", "T4", "V100")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("t4", "T4"),
        ("T4", "T4"),
        ("a10g", "A10G"),
        (" l40s ", "L40S"),
        ("NVIDIA H100", "H100"),
        ("a100", "A100"),
        ("k80", None),
        ("", None),
        ("A10", None),
    ],
)
def test_canonical_gpu(catalog: Catalog, given: str, expected: str | None) -> None:
    assert catalog.canonical_gpu(given) == expected


def test_ebs_price_falls_back_to_us_east_1(catalog: Catalog) -> None:
    assert catalog.ebs_price("us-east-1") == 0.08
    assert catalog.ebs_price("eu-central-1") == catalog.ebs_gp3_per_gb_month["eu-central-1"]
    assert catalog.ebs_price("sa-east-1") == catalog.ebs_price("us-east-1")


def test_ebs_price_without_us_east_1_errs_expensive() -> None:
    data = raw_catalog()
    data["ebs_gp3_per_gb_month"] = {"eu-west-1": 0.088, "eu-central-1": 0.0952}
    assert parse_catalog(data).ebs_price("sa-east-1") == 0.0952


def test_load_catalog_is_cached() -> None:
    assert load_catalog() is load_catalog()


def test_records_are_frozen(catalog: Catalog) -> None:
    itype = catalog.instance_types[0]
    assert isinstance(itype, InstanceType)
    with pytest.raises(dataclasses.FrozenInstanceError):
        itype.gpu_count = 99  # type: ignore[misc]
    with pytest.raises(TypeError):
        itype.on_demand["us-east-1"] = 0.0  # type: ignore[index]
    with pytest.raises(TypeError):
        catalog.ebs_gp3_per_gb_month["us-east-1"] = 0.0  # type: ignore[index]
    assert hash(itype) == hash(dataclasses.replace(itype))


def test_parse_catalog_round_trips_the_shipped_file(catalog: Catalog) -> None:
    # load_catalog adds what the image recipe says about Theano's GPUs; the file has the rest.
    assert parse_catalog(raw_catalog()) == replace(catalog, theano_gpus=None, theano_cuda=None)
    assert catalog.theano_gpus and catalog.theano_cuda


# --- validation ------------------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set(("instance_types", 0, "gpu_count"), 0), "'g4dn.xlarge'"),
        (_set(("instance_types", 0, "gpu_count"), 1.5), "gpu_count"),
        (_set(("instance_types", 0, "gpu_count"), True), "gpu_count"),
        (_set(("instance_types", 1, "gpu"), _DELETE), "'g4dn.2xlarge'"),
        (_set(("instance_types", 1, "gpu"), ""), "'gpu'"),
        (_set(("instance_types", 2, "vcpus"), "16"), "'g4dn.4xlarge'"),
        (_set(("instance_types", 2, "memory_gib"), -1), "memory_gib"),
        (_set(("instance_types", 2, "gpu_memory_gib"), None), "gpu_memory_gib"),
        (_set(("instance_types", 3, "family"), "g5"), "'g4dn.8xlarge'"),
        (_set(("instance_types", 0, "on_demand", "us-east-1"), 0), "'g4dn.xlarge'"),
        (_set(("instance_types", 0, "on_demand", "us-east-1"), float("nan")), "us-east-1"),
        (_set(("instance_types", 0, "on_demand", "mars-north-1"), 1.0), "mars-north-1"),
        (_set(("instance_types", 0, "on_demand"), {}), "at least one region"),
        (_set(("instance_types", 0, "on_demand"), [0.5]), "on_demand"),
        (_set(("instance_types", 0, "name"), "g4dn"), "instance_types[0]"),
        (_set(("instance_types", 4), "g4dn.12xlarge"), "instance_types[4]"),
        (_set(("instance_types",), []), "instance_types"),
        (_set(("schema",), 2), "schema"),
        (_set(("generated",), "last tuesday"), "generated"),
        (_set(("generated",), _DELETE), "generated"),
        (_set(("source",), ""), "source"),
        (_set(("currency",), "EUR"), "currency"),
        (_set(("regions",), []), "regions"),
        (_set(("regions",), ["us-east-1", "us-east-1"]), "twice"),
        (_set(("ebs_gp3_per_gb_month",), {}), "ebs_gp3_per_gb_month"),
        (_set(("ebs_gp3_per_gb_month", "us-east-1"), "cheap"), "ebs_gp3_per_gb_month"),
    ],
)
def test_parse_catalog_refuses_bad_data(mutate: Any, message: str) -> None:
    data = copy.deepcopy(raw_catalog())
    mutate(data)
    with pytest.raises(CloudtrainError) as info:
        parse_catalog(data)
    assert message in info.value.message
    assert info.value.hint and "catalog_update" in info.value.hint


def test_parse_catalog_refuses_duplicate_types() -> None:
    data = raw_catalog()
    data["instance_types"].append(copy.deepcopy(data["instance_types"][0]))
    with pytest.raises(CloudtrainError, match="'g4dn.xlarge' appears twice"):
        parse_catalog(data)
