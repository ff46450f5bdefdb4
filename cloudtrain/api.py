"""What the CLI and the tests call: plan a job, report costs.

Each function takes ``Settings`` and returns a typed record; none prints or exits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from cloudtrain.catalog import load_catalog
from cloudtrain.planner import Plan, candidate_types, plan
from cloudtrain.records import utcnow
from cloudtrain.settings import DEFAULT_REGION, Settings
from cloudtrain.spec import JobSpec, json_schema, load_job


@contextmanager
def cloud_settings(settings: Settings, dry_run: bool) -> Iterator[Settings]:
    """The settings to reach AWS with: as given, or pointed at the simulated AWS."""
    if not dry_run:
        yield settings
        return
    from cloudtrain.cloud.simulator import simulated_aws

    with simulated_aws(settings) as simulated:
        yield simulated


def job_region(spec: JobSpec, settings: Settings) -> str:
    """The job's region, else the profile's, else us-east-1."""
    if spec.resources.region:
        return spec.resources.region
    if settings.simulated:
        return settings.region or DEFAULT_REGION
    from cloudtrain.cloud.aws import profile_region

    return profile_region(settings) or DEFAULT_REGION


def plan_job(
    job_path: str | os.PathLike[str],
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> Plan:
    """Validate the job (before any AWS call), fetch spot prices, choose an offer."""
    catalog = load_catalog()
    spec = load_job(job_path, catalog)
    now = now or utcnow()
    with cloud_settings(settings, dry_run) as active:
        from cloudtrain.cloud.aws import AwsCloud

        region = job_region(spec, active)
        types = [t.name for t in candidate_types(spec, catalog) if t.on_demand_price(region) is not None]
        prices = (
            AwsCloud(active, region).spot_prices(types, spec.resources.zones, now)
            if types and spec.resources.spot
            else []
        )
        return plan(spec, catalog, prices, region=region, now=now, simulated=active.simulated)


def job_schema() -> dict[str, Any]:
    return json_schema()
