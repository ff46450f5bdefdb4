"""A run's spending while it goes: cost and hours so far, against its ``budget:``.

Cost so far is what AWS bills: each instance's price x the seconds from running to
terminated (or now), at least the 60-s minimum, plus its EBS volume for that time; summed
over every instance of the run (relaunches included). Hours so far run from the run's
start (its first instance running). The orchestrator asks ``breach`` as the log streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from cloudtrain.ledger import MIN_BILLED_SECONDS, InstanceRow

if TYPE_CHECKING:  # the job's model loads pydantic: `status` goes without it
    from cloudtrain.spec import Budget

HOURS_PER_MONTH = 730.0  # AWS prices EBS per GB-month of 730 hours
DEFAULT_DEADLINE_HOURS = 24.0  # without budget.max_hours: this long after a controller last followed


def spent_usd(instances: Sequence[InstanceRow], now: datetime) -> float:
    """What the run's instances have cost up to ``now``."""
    total = 0.0
    for i in instances:
        if i.running_at is None:
            continue
        seconds = max(float(MIN_BILLED_SECONDS), ((i.terminated_at or now) - i.running_at).total_seconds())
        hours = seconds / 3600.0
        total += hours * i.price_per_hour + hours / HOURS_PER_MONTH * i.disk_gb * i.ebs_per_gb_month
    return total


def left(
    budget: Budget, started_at: datetime | None, instances: Sequence[InstanceRow], now: datetime
) -> str | None:
    """``$0.9876 and 0.91 h left`` of the budget's limits (None without one)."""
    parts = []
    if budget.max_cost_usd is not None:
        parts.append(f"${max(0.0, budget.max_cost_usd - spent_usd(instances, now)):.4f}")
    if budget.max_hours is not None:
        parts.append(f"{max(0.0, budget.max_hours - hours_since(started_at, now)):.2f} h")
    return " and ".join(parts) + " left" if parts else None


def hours_since(started_at: datetime | None, now: datetime) -> float:
    return 0.0 if started_at is None else max(0.0, (now - started_at).total_seconds() / 3600.0)


def breach(
    budget: Budget, started_at: datetime | None, instances: Sequence[InstanceRow], now: datetime
) -> str | None:
    """The limit reached, as a sentence naming it; None while within budget."""
    if budget.max_cost_usd is not None:
        spent = spent_usd(instances, now)
        if spent >= budget.max_cost_usd:
            return f"budget.max_cost_usd reached: ${spent:.4f} spent of ${budget.max_cost_usd:g}"
    if budget.max_hours is not None:
        hours = hours_since(started_at, now)
        if hours >= budget.max_hours:
            return f"budget.max_hours reached: {hours:.3f} h of {budget.max_hours:g} h since the run started"
    return None


def describe(
    budget: Budget, started_at: datetime | None, instances: Sequence[InstanceRow], now: datetime
) -> str:
    """``so far: $0.0123, 0.08 h (budget: $5, 4 h)``, for the live display."""
    limits = [f"${budget.max_cost_usd:g}"] if budget.max_cost_usd is not None else []
    limits += [f"{budget.max_hours:g} h"] if budget.max_hours is not None else []
    text = f"so far: ${spent_usd(instances, now):.4f}, {hours_since(started_at, now):.2f} h"
    return text + (f" (budget: {', '.join(limits)})" if limits else "")


def deadline_rule(budget: Budget) -> str:
    """When a run with ``budget`` ends whatever happens, in words (`plan` says it)."""
    if budget.max_hours is not None:
        return f"{budget.max_hours:g} h after it starts (budget.max_hours), whatever happens"
    return (
        f"{DEFAULT_DEADLINE_HOURS:g} h after cloudtrain last followed it (`run`, `attach` and `logs -f` "
        "move it on as they follow); budget.max_hours sets a hard limit"
    )
