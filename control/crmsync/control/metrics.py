"""Prometheus metrics of every workflow, read from the supervisor at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crmsync.control.status import Status
from crmsync.control.supervisor_protocol import Supervisor

STATUSES: tuple[Status, ...] = ("RUNNING", "STOPPED", "STARTING", "FAILED")


class WorkflowCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "crmsync_workflow_backlog",
            "Records in Kafka not yet written to the target (the consumer group's lag)",
            labels=["workflow"],
        )
        status = GaugeMetricFamily(
            "crmsync_workflow_status",
            "1 for the workflow's current status",
            labels=["workflow", "status"],
        )
        pending = GaugeMetricFamily(
            "crmsync_workflow_pending_changes",
            "1 while an edited config waits for a restart",
            labels=["workflow"],
        )
        workers = GaugeMetricFamily(
            "crmsync_workflow_live_workers", "Workers with a recent heartbeat", labels=["workflow"]
        )
        written = CounterMetricFamily(
            "crmsync_workflow_records_written",
            "Records written to the target, summed over the reporting workers (resets when a "
            "worker restarts)",
            labels=["workflow"],
        )
        dead = CounterMetricFamily(
            "crmsync_workflow_dead_letters",
            "Records sent to the dead-letter topic, summed over the reporting workers",
            labels=["workflow"],
        )
        for figures in self._supervisor.figures():
            if figures.backlog is not None:
                backlog.add_metric([figures.name], figures.backlog)
            for name in STATUSES:
                status.add_metric([figures.name, name], 1.0 if figures.status == name else 0.0)
            pending.add_metric([figures.name], 1.0 if figures.pending_changes else 0.0)
            workers.add_metric([figures.name], figures.live_workers)
            written.add_metric([figures.name], figures.records_written)
            dead.add_metric([figures.name], figures.dead_lettered)
        yield from (backlog, status, pending, workers, written, dead)


def registry(supervisor: Supervisor) -> CollectorRegistry:
    """A registry of our own: the process's default collectors are not part of the API."""
    result = CollectorRegistry(auto_describe=False)
    result.register(WorkflowCollector(supervisor))
    return result
