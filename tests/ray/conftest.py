"""One local Ray instance for every Ray test (starting one takes 7–16 s on a small machine).

The RayExecutor finds Ray already initialised and reuses it, as it would under `ray job submit`. Metrics are
reported every second (not every 10 s) so that tests can scrape them from the node's export port on
127.0.0.1 soon after they are recorded.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from ray_helpers import RayNode


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def ray_node() -> Iterator[RayNode]:
    ray = pytest.importorskip("ray")
    metrics_port = _free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,  # the state API (list_actors) is served by the dashboard
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(),  # 8265 may belong to someone else's Ray on a shared machine
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
        logging_level=logging.WARNING,
    )
    try:
        yield RayNode(metrics_port)
    finally:
        ray.shutdown()
