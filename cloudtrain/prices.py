"""Judging spot prices: which observations to trust, and what stands in for them.

A leaf shared by the planner (which falls back to the catalog for a stale or
implausible price, or without credentials) and the simulator (which quotes the
catalog's prices by the same rule): the catalog's observed median for the zone where
it has one, else an estimate, labelled as one wherever it is shown.
"""

from __future__ import annotations

from datetime import datetime, timedelta

# GPU spot capacity has traded at roughly a third of on-demand for years; an estimate
# is marked as such wherever it is shown, never passed off as a quote.
ESTIMATED_SPOT_FRACTION = 0.35
ESTIMATE_LABEL = f"estimate: on-demand × {ESTIMATED_SPOT_FRACTION:g}"
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


def catalog_spot(observed: float | None, on_demand: float) -> tuple[float, bool]:
    """The catalog's spot price for a zone: (its observed median, True), or, where it has
    none, (the estimate, False)."""
    return (observed, True) if observed is not None else (estimated_spot(on_demand), False)
