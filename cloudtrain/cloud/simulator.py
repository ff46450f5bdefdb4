"""The simulated AWS behind ``--dry-run``: a moto server on 127.0.0.1 with real prices.

Dry-run swaps endpoints, not code paths: ``simulated_aws`` starts the moto server,
and yields ``Settings`` whose ``endpoint_url`` points every boto3 client at it. The
server runs in this process, so it can fill in what moto leaves canned: spot prices
are the catalog's on-demand price times one fixed simulated discount, quoted now.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cloudtrain.catalog import load_catalog
from cloudtrain.prices import simulated_spot
from cloudtrain.records import iso, utcnow
from cloudtrain.settings import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()


def _simulated_price_history(self: Any) -> Any:
    """moto's DescribeSpotPriceHistory, quoting the simulator's price rule instead of 0.00001."""
    from moto.core.responses import ActionResult

    catalog = load_catalog()
    requested = self._get_param("InstanceTypes", [])
    offers = self.ec2_backend.describe_spot_price_history(requested, self._filters_from_querystring())
    region = self.region
    now = iso(utcnow())
    history = []
    for offer in offers:
        itype = catalog.get(offer["InstanceType"])
        on_demand = itype.on_demand_price(region) if itype else None
        if on_demand is None:
            continue
        history.append(
            {
                "InstanceType": offer["InstanceType"],
                "ProductDescription": "Linux/UNIX (Amazon VPC)",
                "SpotPrice": f"{simulated_spot(on_demand):.6f}",
                "AvailabilityZone": offer["Location"],
                "Timestamp": now,
            }
        )
    return ActionResult({"SpotPriceHistory": history})


@contextmanager
def simulated_aws(settings: Settings) -> Iterator[Settings]:
    """Run a moto server on a free loopback port; yield settings that point at it."""
    from moto.ec2.responses.spot_instances import SpotInstances
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with _lock:
        original = SpotInstances.describe_spot_price_history
        SpotInstances.describe_spot_price_history = _simulated_price_history  # type: ignore[method-assign]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto's state lives in this process: start each simulated cloud empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    log.info("simulated AWS at %s", endpoint)
    try:
        yield settings.with_(endpoint_url=endpoint, simulated=True, ssh_cidr="127.0.0.1/32", profile=None)
    finally:
        with _lock:
            server.stop()
            SpotInstances.describe_spot_price_history = original  # type: ignore[method-assign]
