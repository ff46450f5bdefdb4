"""Launching when AWS has no capacity: the next zone or type, a bounded number of tries,
on-demand only when the job allows it; quota and price errors fail fast, leaving nothing."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_aws import ec2_error
from test_run_e2e import live_instances, only_run, py, sim_image, status, write_job  # noqa: F401  (fixture)

import cloudtrain.cloud.aws as aws
from cloudtrain.catalog import load_catalog
from cloudtrain.errors import CapacityError, PriceError, QuotaError
from cloudtrain.orchestrator import MAX_LAUNCH_OFFERS
from cloudtrain.planner import launch_offers, plan
from cloudtrain.records import Lifecycle, SpotPrice
from cloudtrain.settings import Settings
from cloudtrain.spec import load_job

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
CATALOG = load_catalog()


def planned(tmp_path: Path, resources: str) -> Any:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: j\nrun: python t.py\nresources:\n  region: us-east-1\n{resources}")
    prices = [
        SpotPrice("g4dn.xlarge", "us-east-1a", 0.20, NOW),
        SpotPrice("g4dn.xlarge", "us-east-1b", 0.21, NOW),
        SpotPrice("g4dn.2xlarge", "us-east-1a", 0.30, NOW),
        SpotPrice("g4dn.4xlarge", "us-east-1a", 0.90, NOW),
    ]
    return plan(load_job(path), CATALOG, prices, region="us-east-1", now=NOW)


def names(offers: list[Any]) -> list[tuple[str, str | None, str]]:
    return [(o.instance.name, o.zone, o.lifecycle.value) for o in offers]


def test_the_choice_first_then_other_zones_then_other_types(tmp_path: Path) -> None:
    offers = launch_offers(planned(tmp_path, "  gpu: T4\n"), MAX_LAUNCH_OFFERS)
    assert names(offers)[:3] == [
        ("g4dn.xlarge", "us-east-1a", "spot"),
        ("g4dn.xlarge", "us-east-1b", "spot"),
        ("g4dn.2xlarge", "us-east-1a", "spot"),
    ]
    assert len(offers) == MAX_LAUNCH_OFFERS and all(o.lifecycle is Lifecycle.SPOT for o in offers)
    prices = [o.price_per_hour for o in offers]
    assert prices == sorted(prices)


def test_max_price_bounds_the_alternatives(tmp_path: Path) -> None:
    offers = launch_offers(planned(tmp_path, "  gpu: T4\n  max_price: 0.25\n"), MAX_LAUNCH_OFFERS)
    assert names(offers) == [("g4dn.xlarge", "us-east-1a", "spot"), ("g4dn.xlarge", "us-east-1b", "spot")]


def test_on_demand_only_as_the_last_resort_when_allowed(tmp_path: Path) -> None:
    offers = launch_offers(planned(tmp_path, "  gpu: T4\n  fallback: on-demand\n"), 3)
    assert [o.lifecycle for o in offers] == [Lifecycle.SPOT, Lifecycle.SPOT, Lifecycle.ON_DEMAND]
    assert offers[-1].instance.name == "g4dn.xlarge" and offers[-1].price_per_hour == CATALOG.get(
        "g4dn.xlarge"
    ).on_demand_price("us-east-1")  # type: ignore[union-attr]
    # ... and never above max_price.
    capped = launch_offers(planned(tmp_path, "  gpu: T4\n  fallback: on-demand\n  max_price: 0.25\n"), 3)
    assert all(o.lifecycle is Lifecycle.SPOT for o in capped)


# --- the orchestrator, against the simulated AWS, with faults injected before sending ----------


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """RunInstances answers ``faults["codes"]`` (one per call, popped) before reaching the
    simulated AWS; every attempt's (type, zone, market, token) is recorded in ``faults["seen"]``."""
    state: dict[str, Any] = {"codes": [], "seen": []}
    make_client = aws.make_client

    def before_send(request: Any, **_: Any) -> Any:
        from urllib.parse import parse_qs

        body = parse_qs(request.body.decode() if isinstance(request.body, bytes) else request.body)
        state["seen"].append(
            (
                body["InstanceType"][0],
                body.get("Placement.AvailabilityZone", [None])[0],
                body.get("InstanceMarketOptions.MarketType", ["on-demand"])[0],
                body["ClientToken"][0],
            )
        )
        return ec2_error(state["codes"].pop(0)) if state["codes"] else None

    def patched(settings: Settings, service: str, region: str, **kwargs: Any) -> Any:
        client = make_client(settings, service, region, **kwargs)
        if service == "ec2":
            client.meta.events.register("before-send.ec2.RunInstances", before_send)
        return client

    monkeypatch.setattr(aws, "make_client", patched)
    return state


def test_no_capacity_moves_to_the_next_zone_and_the_run_succeeds(
    sim_image: Path, tmp_path: Path, settings: Settings, faults: dict[str, Any]
) -> None:
    from cloudtrain.api import run_job

    faults["codes"] = ["InsufficientInstanceCapacity", "InsufficientInstanceCapacity"]
    job = write_job(tmp_path / "job", py("print('trained', flush=True)"))
    outcome = run_job(job, settings, dry_run=True, out_dir=tmp_path / "runs")
    assert outcome.exit_code == 0
    tried = faults["seen"]
    assert len(tried) == 3 and len({(t[0], t[1]) for t in tried}) == 3  # three different offers
    assert [t[3] for t in tried] == [f"{outcome.run_id}-{i}" for i in (1, 2, 3)]  # a token each
    record = status(outcome.run_id)
    assert [e["kind"] for e in record["events"]].count("no-capacity") == 2
    assert len(record["instances"]) == 1  # the failed attempts made nothing
    assert (record["instances"][0]["type"], record["instances"][0]["zone"]) == tried[-1][:2]
    assert live_instances(settings, outcome.run_id) == []


def test_no_capacity_anywhere_fails_after_the_bounded_tries(
    sim_image: Path, tmp_path: Path, settings: Settings, faults: dict[str, Any]
) -> None:
    from cloudtrain.api import run_job

    faults["codes"] = ["InsufficientInstanceCapacity"] * 20
    job = write_job(tmp_path / "job", py("print('never runs')"))
    with pytest.raises(CapacityError, match=f"any of the {MAX_LAUNCH_OFFERS} offers tried"):
        run_job(job, settings, dry_run=True, out_dir=tmp_path / "runs")
    assert len(faults["seen"]) == MAX_LAUNCH_OFFERS
    run_id = only_run(tmp_path / "runs").name
    assert status(run_id)["state"] == "failed" and live_instances(settings, run_id) == []


@pytest.mark.parametrize(
    ("code", "error", "named"),
    [
        ("VcpuLimitExceeded", QuotaError, "All G and VT Spot Instance Requests"),
        ("MaxSpotInstanceCountExceeded", QuotaError, "Service Quotas"),
        ("SpotMaxPriceTooLow", PriceError, "max_price"),
    ],
)
def test_quota_and_price_errors_fail_fast_and_leave_nothing(
    sim_image: Path,
    tmp_path: Path,
    settings: Settings,
    faults: dict[str, Any],
    code: str,
    error: type[Exception],
    named: str,
) -> None:
    from cloudtrain.api import run_job

    faults["codes"] = [code] * 20
    job = write_job(tmp_path / "job", py("print('never runs')"))
    with pytest.raises(error) as caught:
        run_job(job, settings, dry_run=True, out_dir=tmp_path / "runs")
    assert named in f"{caught.value.message} {caught.value.hint}"  # type: ignore[attr-defined]
    assert len(faults["seen"]) == 1  # not retried, not moved elsewhere
    run_id = only_run(tmp_path / "runs").name
    record = status(run_id)
    assert record["state"] == "failed" and record["instances"] == []
    assert live_instances(settings, run_id) == []
    assert (
        yaml.safe_load((tmp_path / "runs" / run_id / "job.yaml").read_text())["resources"]["fallback"]
        == "none"
    )
