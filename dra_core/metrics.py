"""Prometheus metrics of the node agent.

Every metric the agent exports is defined here, in one dedicated registry (`REGISTRY`, not
the process-wide default), so services import the objects they update and the HTTP server
(elsewhere) serves `render()`. Names follow the Prometheus conventions: ``_total`` counters,
``_seconds`` histograms.

Labels:
  * ``result``: ``success`` or ``error`` (use `RESULT_SUCCESS` / `RESULT_ERROR`);
  * ``verb``: ``create``, ``update`` or ``delete``;
  * ``device``: the device name in the pool;
  * ``operation`` (errors): ``prepare`` or ``unprepare``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = (
    "API_FEATURE_KEPT",
    "API_REACHABLE",
    "API_WRITES",
    "CONTENT_TYPE",
    "DEVICES_LEFT_OUT",
    "DEVICE_HEALTHY",
    "DISCOVERY_ERRORS",
    "OPERATION_ERRORS",
    "PREPARED_CLAIMS",
    "PREPARE_SECONDS",
    "PREPARE_TOTAL",
    "PUBLISHED_DEVICES",
    "PUBLISHED_SLICES",
    "PUBLISH_ERRORS",
    "PUBLISH_SECONDS",
    "REGISTRY",
    "RESULT_ERROR",
    "RESULT_SUCCESS",
    "UNPREPARE_SECONDS",
    "UNPREPARE_TOTAL",
    "render",
)

#: The registry holding every metric below; serve it, not prometheus_client's default one.
REGISTRY = CollectorRegistry(auto_describe=True)

#: Content type of `render()`'s output, for the HTTP response header.
CONTENT_TYPE = CONTENT_TYPE_LATEST

RESULT_SUCCESS = "success"
RESULT_ERROR = "error"

# Latency buckets from 1 ms to 45 s (the kubelet's per-call timeout).
_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 45.0)

PREPARE_TOTAL = Counter(
    "dra_prepare",
    "Claims prepared (NodePrepareResources, per claim), by result.",
    ["result"],
    registry=REGISTRY,
)
UNPREPARE_TOTAL = Counter(
    "dra_unprepare",
    "Claims unprepared (NodeUnprepareResources, per claim), by result.",
    ["result"],
    registry=REGISTRY,
)
OPERATION_ERRORS = Counter(
    "dra_operation_errors",
    "Failed prepare or unprepare of one claim, by operation and reason.",
    ["operation", "reason"],
    registry=REGISTRY,
)
PREPARE_SECONDS = Histogram(
    "dra_prepare_seconds",
    "Time to prepare one claim, from request to answer.",
    buckets=_CALL_BUCKETS,
    registry=REGISTRY,
)
UNPREPARE_SECONDS = Histogram(
    "dra_unprepare_seconds",
    "Time to unprepare one claim, from request to answer.",
    buckets=_CALL_BUCKETS,
    registry=REGISTRY,
)
PREPARED_CLAIMS = Gauge(
    "dra_prepared_claims",
    "Claims currently prepared on this node (checkpoint entries).",
    registry=REGISTRY,
)
PUBLISHED_DEVICES = Gauge(
    "dra_published_devices",
    "Devices in the ResourceSlices this agent publishes.",
    registry=REGISTRY,
)
PUBLISHED_SLICES = Gauge(
    "dra_published_slices",
    "ResourceSlices this agent publishes (device and counter slices).",
    registry=REGISTRY,
)
PUBLISH_SECONDS = Histogram(
    "dra_publish_seconds",
    "Time of one ResourceSlice sync: read, compare and any writes.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
API_WRITES = Counter(
    "dra_api_writes",
    "Writes to the API server by the agent, by verb (create, update, delete).",
    ["verb"],
    registry=REGISTRY,
)
PUBLISH_ERRORS = Counter(
    "dra_publish_errors",
    "Failed ResourceSlice syncs and writes whose fields the API server dropped.",
    registry=REGISTRY,
)
API_FEATURE_KEPT = Gauge(
    "dra_api_feature_kept",
    "1 when the API server keeps the ResourceSlice fields of an optional feature, 0 when it "
    "drops them (its feature gate is off), by feature gate; set once the agent has asked.",
    ["gate"],
    registry=REGISTRY,
)
DEVICES_LEFT_OUT = Gauge(
    "dra_devices_left_out",
    "Devices of the inventory not published because the API server lacks a feature, by its "
    "feature gate: the scheduler could not allocate them safely there.",
    ["gate"],
    registry=REGISTRY,
)
DEVICE_HEALTHY = Gauge(
    "dra_device_healthy",
    "1 when the backend reports the device healthy, 0 when not.",
    ["device"],
    registry=REGISTRY,
)
API_REACHABLE = Gauge(
    "dra_api_reachable",
    "1 when the API server answered the agent's last claim read or check, 0 when it did not "
    "(unreachable, timed out, throttled or a server error).",
    registry=REGISTRY,
)
DISCOVERY_ERRORS = Counter(
    "dra_discovery_errors",
    "Failed device discoveries by the backend.",
    registry=REGISTRY,
)


def render() -> bytes:
    """All metrics in the Prometheus text format (serve with `CONTENT_TYPE`)."""
    return generate_latest(REGISTRY)


BACKEND_CALLS_STUCK = Gauge(
    "dra_backend_calls_stuck",
    "Backend hook calls that did not return within their time limit and still run, by hook; "
    "the agent fails /healthz when one runs longer than --backend-stuck-seconds.",
    ["hook"],
    registry=REGISTRY,
)
BACKEND_CALL_TIMEOUTS = Counter(
    "dra_backend_call_timeouts",
    "Backend hook calls that did not return within their time limit, by hook.",
    ["hook"],
    registry=REGISTRY,
)
