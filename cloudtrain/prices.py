"""Judging spot prices: which observations to trust, and the estimate used otherwise.

A leaf shared by the planner (which falls back to an estimate for a stale or
implausible price) and the simulator (which quotes simulated prices by one rule).
"""

from __future__ import annotations

from datetime import datetime, timedelta

# GPU spot capacity has traded at roughly a third of on-demand for years; an estimate
# is marked as such wherever it is shown, never passed off as a quote.
ESTIMATED_SPOT_FRACTION = 0.35
# The dry-run simulator's one price rule: catalog on-demand price times this.
SIMULATED_SPOT_FRACTION = 0.30
# AWS records a spot price only when it changes; older than this is not a current quote.
STALE_AFTER = timedelta(days=90)
# No GPU spot price has been below 10 % of on-demand; spot is capped at on-demand.
PLAUSIBLE_FRACTION = (0.10, 1.0)


def price_problem(price: float, on_demand: float, timestamp: datetime, now: datetime) -> str | None:
    """Why a spot price observation cannot be used as a quote, or None if it can."""
    if now - timestamp > STALE_AFTER:
        return f"quoted {timestamp.date().isoformat()}, too old to be current"
    low, high = PLAUSIBLE_FRACTION
    if on_demand > 0 and not (low * on_demand <= price <= high * on_demand * 1.0001):
        return f"${price:g}/h is implausible against the on-demand ${on_demand:g}/h"
    return None


def estimated_spot(on_demand: float) -> float:
    return round(on_demand * ESTIMATED_SPOT_FRACTION, 4)


def simulated_spot(on_demand: float) -> float:
    return round(on_demand * SIMULATED_SPOT_FRACTION, 4)
