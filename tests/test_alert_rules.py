"""The alert rules and the dashboard in deploy/: valid, unit-tested, and about series
the federation really exports.

* ``promtool check rules``/``check config`` accept deploy/prometheus, and ``promtool
  test rules`` runs the rules' unit tests (each alert fires past its threshold and
  stays quiet below it).
* Every ``federation_*`` series the rules or the Grafana dashboard query is exported
  by some process of a running ``federation up`` (scraped for real, after one chat
  request so that labelled series exist); the only others are Prometheus's own ``up``
  and dcgm-exporter's GPU series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.up_support import TEST_MODEL, federation_up

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "federation.json"
EXTERNAL = {"up"}
"""Series Prometheus makes itself (a scrape's ``up``)."""
EXTERNAL_PREFIXES = ("DCGM_",)
"""NVIDIA dcgm-exporter's GPU series (FederationGpuMemoryHigh), scraped on GPU hosts."""

_NAME = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?=\s*(?:\{|\[|\)|/|\s|$|>|<|==|-|\+|\*))")
_PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "predict_linear", "and", "or",
    "vector", "min", "max", "time", "le", "without", "on", "ignoring",
}


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; `make test` "
                    "installs it where apt-get can)")
    return tool


def _run(*args: str) -> str:
    result = subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_accepts_the_rules_and_the_configuration() -> None:
    assert "SUCCESS: 13 rules found" in _run("check", "rules", "federation.rules.yml")
    _run("check", "config", "prometheus.yml")


def test_every_alert_fires_past_its_threshold_and_not_below() -> None:
    assert "SUCCESS" in _run("test", "rules", "federation.rules.test.yml")


def queried_metrics(expressions: list[str]) -> set[str]:
    """The series names in PromQL expressions (functions, keywords and label names
    inside braces left out)."""
    names: set[str] = set()
    for expr in expressions:
        without_labels = re.sub(r"\{[^}]*\}", "{}", expr)
        without_labels = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_labels)
        without_strings = re.sub(r'"[^"]*"', '""', without_labels)
        for name in _NAME.findall(without_strings):
            if name not in _PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+", name):
                names.add(name)
    return names


def rule_expressions() -> list[str]:
    text = (PROMETHEUS / "federation.rules.yml").read_text()
    blocks = re.findall(r"expr: \|\n((?:\s{10}.*\n)+)|expr: (.*)\n", text)
    return [multi or single for multi, single in blocks]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def exported_names(exposition: str) -> set[str]:
    """Sample names a Prometheus text exposition offers, also of labelled families that
    have no sample yet (from their ``# TYPE`` lines)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {"counter": {name.removesuffix("_total") + "_total"},
                      "histogram": {name + "_bucket", name + "_sum", name + "_count"}
                      }.get(kind, {name})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_expressions_are_read_whole() -> None:
    assert len(rule_expressions()) == 13
    assert "federation_disk_free_bytes" in queried_metrics(rule_expressions())
    assert queried_metrics(['sum by (le, route) (rate(x_bucket{route="/v1/a b"}[5m])) / y > 0.1']) \
        == {"x_bucket", "y"}


async def test_every_series_the_rules_and_the_dashboard_query_is_exported(
        tmp_path: Path) -> None:
    async with federation_up(tmp_path / "home", tmp_path / "up.log") as up:
        key = await up.issue_key()
        async with aiohttp.ClientSession() as session:
            async with session.post(
                    up.gateway + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"model": TEST_MODEL, "max_tokens": 4,
                          "messages": [{"role": "user", "content": "hello"}]}) as response:
                assert response.status == 200
            urls = [up.gateway + "/metrics",
                    *(node["metrics"] for node in up.endpoints["nodes"].values())]
            exported: set[str] = set()
            for url in urls:
                async with session.get(url) as response:
                    assert response.status == 200, url
                    exported |= exported_names(await response.text())
    queried = queried_metrics(rule_expressions()) | queried_metrics(dashboard_expressions())
    ours = {n for n in queried if n not in EXTERNAL and not n.startswith(EXTERNAL_PREFIXES)}
    assert ours and all(n.startswith("federation_") for n in ours), ours
    assert sorted(ours - exported) == []
