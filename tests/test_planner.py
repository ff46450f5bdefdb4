"""The planner: offer filtering, the cheapest choice, stale prices, max_price, cost arithmetic."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import cloudtrain
from cloudtrain.catalog import Catalog, load_catalog, parse_catalog
from cloudtrain.errors import CloudtrainError, PlanError
from cloudtrain.planner import plan
from cloudtrain.prices import ESTIMATED_SPOT_FRACTION
from cloudtrain.records import Lifecycle, SpotPrice
from cloudtrain.spec import JobSpec, load_job

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
CATALOG = load_catalog()


def job(tmp_path: Path, resources: str = "", extra: str = "") -> JobSpec:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: j\nrun: python t.py\n{extra}resources:\n  region: us-east-1\n{resources}")
    return load_job(path)


def quote(itype: str, zone: str, price: float, age: timedelta = timedelta(hours=1)) -> SpotPrice:
    return SpotPrice(itype, zone, price, NOW - age)


def od(itype: str, region: str = "us-east-1") -> float:
    found = CATALOG.get(itype)
    assert found is not None
    price = found.on_demand_price(region)
    assert price is not None
    return price


def test_cheapest_live_zone_wins(tmp_path: Path) -> None:
    spec = job(tmp_path, "  gpu: T4\n")
    prices = [
        quote("g4dn.xlarge", "us-east-1a", 0.21),
        quote("g4dn.xlarge", "us-east-1b", 0.19),
        quote("g4dn.2xlarge", "us-east-1b", 0.20),
        quote("g4dn.xlarge", "us-east-1b", 0.50, age=timedelta(days=2)),  # older observation: ignored
    ]
    result = plan(spec, CATALOG, prices, region="us-east-1", now=NOW)
    assert (result.choice.instance.name, result.choice.zone) == ("g4dn.xlarge", "us-east-1b")
    assert result.choice.price_per_hour == 0.19
    assert result.choice.price_source == "live"
    assert result.choice.lifecycle is Lifecycle.SPOT
    assert [o.price_per_hour for o in result.offers] == sorted(o.price_per_hour for o in result.offers)
    assert {o.instance.gpu for o in result.offers} == {"T4"}
    assert result.choice.saving_pct == pytest.approx(100 * (1 - 0.19 / od("g4dn.xlarge")))


def test_default_is_cheapest_single_gpu_offer(tmp_path: Path) -> None:
    spec = job(tmp_path)
    result = plan(spec, CATALOG, [], region="us-east-1", now=NOW)
    assert all(o.instance.gpu_count == 1 for o in result.offers)
    singles = [t for t in CATALOG.instance_types if t.gpu_count == 1 and t.on_demand_price("us-east-1")]
    cheapest = min(singles, key=lambda t: t.on_demand["us-east-1"])
    assert result.choice.instance.name == cheapest.name


def test_gpu_count_is_exact(tmp_path: Path) -> None:
    spec = job(tmp_path, "  gpu: 'V100:4'\n")
    result = plan(spec, CATALOG, [], region="us-east-1", now=NOW)
    assert {o.instance.name for o in result.offers} == {"p3.8xlarge"}


def test_placeholder_prices_fall_back_to_marked_estimate(tmp_path: Path) -> None:
    """moto quotes 0.00001 dated 2006: never a $0.00 job."""
    spec = job(tmp_path, "  instance_type: g4dn.xlarge\n")
    moto_like = [
        SpotPrice(
            "g4dn.xlarge",
            "us-east-1a",
            0.00001,
            datetime(2006, 1, 2, 15, 4, 5, tzinfo=timezone.utc),
        )
    ]
    result = plan(spec, CATALOG, moto_like, region="us-east-1", now=NOW)
    assert result.choice.price_source == "estimate"
    assert result.choice.price_per_hour == pytest.approx(
        od("g4dn.xlarge") * ESTIMATED_SPOT_FRACTION, abs=1e-4
    )
    assert result.choice.note is not None and "too old" in result.choice.note
    assert result.choice.zone == "us-east-1a"


def test_implausibly_low_fresh_price_is_not_trusted(tmp_path: Path) -> None:
    spec = job(tmp_path, "  instance_type: g4dn.xlarge\n")
    result = plan(spec, CATALOG, [quote("g4dn.xlarge", "us-east-1a", 0.00001)], region="us-east-1", now=NOW)
    assert result.choice.price_source == "estimate"
    assert result.choice.note is not None and "implausible" in result.choice.note


def test_no_history_means_estimate_in_any_zone(tmp_path: Path) -> None:
    spec = job(tmp_path, "  instance_type: g5.xlarge\n")
    result = plan(spec, CATALOG, [], region="us-east-1", now=NOW)
    assert result.choice.zone is None and result.choice.price_source == "estimate"


def test_zones_filter(tmp_path: Path) -> None:
    spec = job(tmp_path, "  gpu: T4\n  zones: [us-east-1c]\n")
    prices = [quote("g4dn.xlarge", "us-east-1a", 0.15), quote("g4dn.xlarge", "us-east-1c", 0.25)]
    result = plan(spec, CATALOG, prices, region="us-east-1", now=NOW)
    assert {o.zone for o in result.offers} == {"us-east-1c"}


def test_nothing_under_max_price_names_the_cheapest(tmp_path: Path) -> None:
    spec = job(tmp_path, "  gpu: T4\n  max_price: 0.10\n")
    prices = [quote("g4dn.xlarge", "us-east-1d", 0.1712), quote("g4dn.2xlarge", "us-east-1d", 0.30)]
    with pytest.raises(PlanError) as info:
        plan(spec, CATALOG, prices, region="us-east-1", now=NOW)
    assert "no offer under max_price $0.1000/h" in info.value.message
    assert "g4dn.xlarge in us-east-1d at $0.1712/h" in info.value.message
    assert info.value.hint and "max_price" in info.value.hint


def test_max_price_skips_dearer_offers(tmp_path: Path) -> None:
    spec = job(tmp_path, "  gpu: T4\n  max_price: 0.2\n  zones: [us-east-1a, us-east-1b]\n")
    prices = [quote("g4dn.xlarge", "us-east-1a", 0.25), quote("g4dn.xlarge", "us-east-1b", 0.18)]
    result = plan(spec, CATALOG, prices, region="us-east-1", now=NOW)
    assert result.choice.zone == "us-east-1b"


def test_on_demand(tmp_path: Path) -> None:
    spec = job(tmp_path, "  gpu: A10G\n  spot: false\n")
    result = plan(spec, CATALOG, [quote("g5.xlarge", "us-east-1a", 0.3)], region="us-east-1", now=NOW)
    assert result.choice.lifecycle is Lifecycle.ON_DEMAND
    assert result.choice.price_per_hour == od("g5.xlarge")
    assert result.choice.saving_pct == 0


def test_region_without_the_gpu(tmp_path: Path) -> None:
    spec = job(tmp_path, "  gpu: T4\n")
    with pytest.raises(PlanError, match="offered in mars-east-1"):
        plan(spec, CATALOG, [], region="mars-east-1", now=NOW)


def test_cost_estimate_compute_plus_ebs(tmp_path: Path) -> None:
    spec = job(tmp_path, "  instance_type: g4dn.xlarge\n  disk_gb: 100\n", extra="budget: {max_hours: 4}\n")
    result = plan(spec, CATALOG, [quote("g4dn.xlarge", "us-east-1a", 0.2)], region="us-east-1", now=NOW)
    assert result.estimate is not None
    ebs = CATALOG.ebs_price("us-east-1")
    assert result.estimate.compute_usd == pytest.approx(0.8)
    assert result.estimate.ebs_usd == pytest.approx(100 * ebs * 4 / 730)
    assert result.estimate.total_usd == pytest.approx(0.8 + 100 * ebs * 4 / 730)
    assert result.to_json()["estimate"]["total_usd"] == round(result.estimate.total_usd, 4)


def test_several_nodes_multiply_the_estimate_not_the_offers(tmp_path: Path) -> None:
    """Each node is an instance with its own root volume; an offer prices one instance (the ledger
    records one row per instance at the offer's price)."""
    resources = "  instance_type: g4dn.xlarge\n  disk_gb: 100\n  nodes: 3\n"
    spec = job(tmp_path, resources, extra="keras: 2\nbudget: {max_hours: 4}\n")
    result = plan(spec, CATALOG, [quote("g4dn.xlarge", "us-east-1a", 0.2)], region="us-east-1", now=NOW)
    assert result.nodes == 3
    assert [o.price_per_hour for o in result.offers] == [0.2] and result.choice.price_per_hour == 0.2
    assert result.price_per_hour_all_nodes == pytest.approx(0.6)
    assert result.estimate is not None
    ebs = CATALOG.ebs_price("us-east-1")
    assert result.estimate.compute_usd == pytest.approx(3 * 0.8)
    assert result.estimate.ebs_usd == pytest.approx(3 * 100 * ebs * 4 / 730)
    data = json.loads(json.dumps(result.to_json()))
    assert data["nodes"] == 3 and data["choice"]["price_per_hour"] == 0.2
    assert data["estimate"]["total_usd"] == round(3 * (0.8 + 100 * ebs * 4 / 730), 4)


def test_no_budget_no_estimate(tmp_path: Path) -> None:
    result = plan(job(tmp_path, "  gpu: T4\n"), CATALOG, [], region="us-east-1", now=NOW)
    assert result.estimate is None


def test_plan_json_contract(tmp_path: Path) -> None:
    result = plan(
        job(tmp_path, "  gpu: T4\n"),
        CATALOG,
        [quote("g4dn.xlarge", "us-east-1a", 0.2)],
        region="us-east-1",
        now=NOW,
        simulated=True,
    )
    data = result.to_json()
    assert data["schema"] == 1 and data["nodes"] == 1
    # the simulator quotes the catalog, which has no observation of g4dn.xlarge: an estimate
    assert data["choice"]["price_source"] == "estimate"
    assert data["choice"]["price_label"] == "estimate: on-demand × 0.35"
    assert data["simulated"] is True and data["price_basis"] == "simulated"
    assert data["catalog_date"] == CATALOG.generated.isoformat()


# --- the Theano image's GPUs (ami/theano-gpus.json) --------------------------------------


def test_theano_gpus_come_from_the_image_recipe() -> None:
    data = json.loads((Path(__file__).resolve().parents[1] / "ami" / "theano-gpus.json").read_text())
    listed = {gpu for models in data["architectures"].values() for gpu in models}
    assert set(CATALOG.theano_gpus or ()) == listed and CATALOG.theano_cuda == data["cuda"]
    assert listed and listed <= set(CATALOG.gpu_names())  # every one is a GPU the catalog rents


@pytest.mark.parametrize(
    "resources",
    ["  gpu: A10G\n", "  gpu: h100:8\n", "  instance_type: g5.xlarge\n", "  gpu: A100:8\n"],
)
def test_theano_job_on_a_gpu_the_image_cannot_drive_is_refused(tmp_path: Path, resources: str) -> None:
    spec = job(tmp_path, resources, extra="backend: theano\n")
    with pytest.raises(PlanError) as caught:
        plan(spec, CATALOG, [], region="us-east-1", now=NOW)
    message = caught.value.message
    assert message.startswith("backend: theano cannot drive")
    assert all(gpu in message for gpu in CATALOG.theano_gpus or ("?",))
    assert "backend: tensorflow" in (caught.value.hint or "")


def test_theano_job_without_a_gpu_choice_gets_only_gpus_it_can_drive(tmp_path: Path) -> None:
    theano = plan(job(tmp_path, extra="backend: theano\n"), CATALOG, [], region="us-east-1", now=NOW)
    assert {o.instance.gpu for o in theano.offers} <= set(CATALOG.theano_gpus or ())
    assert theano.choice.instance.gpu in (CATALOG.theano_gpus or ())
    tensorflow = plan(job(tmp_path), CATALOG, [], region="us-east-1", now=NOW)
    assert {o.instance.gpu for o in tensorflow.offers} > {o.instance.gpu for o in theano.offers}


def test_theano_job_on_a_t4_is_planned(tmp_path: Path) -> None:
    result = plan(
        job(tmp_path, "  gpu: T4\n", extra="backend: theano\n"), CATALOG, [], region="us-east-1", now=NOW
    )
    assert result.choice.instance.gpu == "T4"


def observed_catalog() -> Catalog:
    """The shipped catalog with spot medians for g4dn.xlarge in two zones, as the updater
    writes them (a type's ``spot``, the catalog's ``spot_observed``)."""
    data = json.loads((Path(cloudtrain.__file__).parent / "data" / "catalog.json").read_text())
    data["spot_observed"] = {"from": "2026-11-24", "to": "2026-12-01"}
    for entry in data["instance_types"]:
        if entry["name"] == "g4dn.xlarge":
            entry["spot"] = {"us-east-1a": 0.2011, "us-east-1c": 0.1702, "us-west-2b": 0.15}
    return parse_catalog(data)


def test_without_credentials_the_catalog_prices_the_plan_and_says_so(tmp_path: Path) -> None:
    catalog = observed_catalog()
    result = plan(job(tmp_path, "  gpu: T4\n"), catalog, None, region="us-east-1", now=NOW)
    assert result.price_basis == "catalog"
    # observed medians per zone of the region (not us-west-2's), labelled with their last day
    observed = [(o.zone, o.price_per_hour) for o in result.offers if o.instance.name == "g4dn.xlarge"]
    assert observed == [("us-east-1c", 0.1702), ("us-east-1a", 0.2011)]
    choice = result.choice
    assert (choice.instance.name, choice.zone, choice.price_source) == (
        "g4dn.xlarge",
        "us-east-1c",
        "catalog",
    )
    assert (
        choice.label == "catalog 2026-12-01"
        and choice.note == "median spot price observed 2026-11-24 to 2026-12-01"
    )
    # a type the catalog never observed: an estimate, labelled as one, never as observed
    other = next(o for o in result.offers if o.instance.name == "g4dn.2xlarge")
    assert (other.price_source, other.label, other.zone) == ("estimate", "estimate: on-demand × 0.35", None)
    assert other.price_per_hour == pytest.approx(od("g4dn.2xlarge") * ESTIMATED_SPOT_FRACTION, abs=1e-4)
    # the shipped catalog has no observations: every spot price is an estimate
    shipped = plan(job(tmp_path, "  gpu: T4\n"), CATALOG, None, region="us-east-1", now=NOW)
    assert {o.price_source for o in shipped.offers} == {"estimate"}


def test_on_demand_prices_say_they_are_the_catalogs(tmp_path: Path) -> None:
    result = plan(job(tmp_path, "  gpu: T4\n  spot: false\n"), CATALOG, None, region="us-east-1", now=NOW)
    assert result.price_basis == "on-demand"
    assert result.choice.label == f"catalog {CATALOG.generated}"


def test_a_simulated_quote_is_labelled_as_the_catalog_price_it_replays(tmp_path: Path) -> None:
    catalog = observed_catalog()
    quotes = [quote("g4dn.xlarge", "us-east-1c", 0.1702), quote("g4dn.xlarge", "us-east-1b", 0.1841)]
    result = plan(
        job(tmp_path, "  instance_type: g4dn.xlarge\n"),
        catalog,
        quotes,
        region="us-east-1",
        now=NOW,
        simulated=True,
    )
    labels = {o.zone: (o.price_source, o.label) for o in result.offers}
    assert labels == {
        "us-east-1c": ("catalog", "catalog 2026-12-01"),
        "us-east-1b": ("estimate", "estimate: on-demand × 0.35"),
    }


def test_the_catalog_refuses_spot_prices_without_their_window() -> None:
    data = json.loads((Path(cloudtrain.__file__).parent / "data" / "catalog.json").read_text())
    data["instance_types"][0]["spot"] = {"us-east-1a": 0.2}
    with pytest.raises(CloudtrainError, match="spot_observed"):
        parse_catalog(data)
    data["spot_observed"] = {"from": "2026-11-24", "to": "2026-12-01"}
    data["instance_types"][0]["spot"] = {"mars-north-1a": 0.2}
    with pytest.raises(CloudtrainError, match="mars-north-1a"):
        parse_catalog(data)
