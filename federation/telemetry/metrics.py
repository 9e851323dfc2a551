"""Prometheus series an operator alerts on that no single service owns.

* ``federation_database_up``: 1 while the process's database watch reaches a
  writable PostgreSQL, else 0 (every process with a database).
* ``federation_disk_free_bytes`` / ``federation_disk_size_bytes``: the filesystem of
  each directory the process writes (the home, the embedded database's data, the
  broker's uploads and blobs, the gateway's outbox), so an alert fires while there is
  still room, not when writes start failing.
* ``federation_certificate_expiry_timestamp_seconds``: when the process's own
  certificate, its intermediate and the CA it trusts expire (Unix time), for a "renew
  within 7 days" alert; exported by :class:`federation.credentials.CertificateExpiry`,
  which follows renewals (``NodeServer``, ``GatewayServer``).

Each is a collector read at scrape time (``os.statvfs`` is a few microseconds), so
nothing runs between scrapes. Names follow Prometheus conventions: base units,
``_bytes``, ``_seconds``; the inference queue's series live with the inference node.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from federation.config import Settings
from federation.db import embedded_data_dir


class LabelledChildren:
    """``metric.labels(*values)``, each child kept after its first use: prometheus_client
    checks the values and takes a lock at every ``labels`` call (about 4 us), several
    times per request on a hot path. Only for label sets a process holds anyway (routes,
    models, methods, status codes): the children live as long as the metrics."""

    def __init__(self) -> None:
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def __call__(self, metric: Counter | Gauge | Histogram, *values: str) -> Any:
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child


class DiskSpaceCollector(Collector):
    """Free and total bytes of the filesystem holding each named directory.

    A directory that does not exist yet (the broker's blobs before the first upload)
    is measured at its nearest existing parent: the space it will be written to.
    """

    def __init__(self, volumes: Mapping[str, Path]) -> None:
        self._volumes = dict(volumes)

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(
            "federation_disk_free_bytes",
            "Bytes an unprivileged writer can still use on the filesystem of each volume.",
            labels=("volume", "path"))
        size = GaugeMetricFamily(
            "federation_disk_size_bytes", "Size of the filesystem of each volume.",
            labels=("volume", "path"))
        for name, path in sorted(self._volumes.items()):
            measured = _existing(path)
            if measured is None:
                continue
            try:
                stat = os.statvfs(measured)
            except OSError:
                continue
            labels = (name, str(path))
            free.add_metric(labels, float(stat.f_bavail * stat.f_frsize))
            size.add_metric(labels, float(stat.f_blocks * stat.f_frsize))
        yield free
        yield size


def _existing(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def volumes_for(settings: Settings, role: str) -> dict[str, Path]:
    """The directories process ``role`` writes, by volume name."""
    home = settings.home.resolve()
    volumes = {"home": home}
    data = embedded_data_dir(home)
    if data.exists():  # the embedded database (resolved: it may live under /var/lib)
        volumes["database"] = data.resolve()
    if role == "broker":
        volumes["uploads"] = home / "uploads"
        volumes["blobs"] = home / "blobs"
    if role == "gateway":
        volumes["outbox"] = home / settings.gateway.outbox_dir
    return volumes


class GaugeCollector(Collector):
    """One unlabelled gauge whose value is read from ``read()`` at each scrape."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self._read())


def database_up_collector(reachable: Callable[[], bool]) -> GaugeCollector:
    return GaugeCollector(
        "federation_database_up",
        "1 while this process reaches a writable PostgreSQL (its database watch), else 0.",
        lambda: 1.0 if reachable() else 0.0)


def register_process_metrics(registry: CollectorRegistry, settings: Settings, role: str
                             ) -> None:
    """Disk space, for every node and the gateway (certificate expiry: see the module
    docstring)."""
    registry.register(DiskSpaceCollector(volumes_for(settings, role)))
