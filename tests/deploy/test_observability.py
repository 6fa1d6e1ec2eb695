"""The dashboards and alert rules: committed as generated, valid for promtool, and naming only real metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services.common import metrics
from services.deploy import observability as obs
from services.deploy.roles import roles

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"


def _tool(name: str) -> str:
    """The path of ``name``; skipped when it is missing, except in CI (``CI`` set), where that fails."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (Debian's prometheus package); CI must have it")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


def _load(rel: str) -> Any:
    return yaml.safe_load((ROOT / rel).read_text(encoding="utf-8"))


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load(obs.ALERTS)["groups"] for rule in group["rules"]]


def _dashboards() -> dict[str, dict[str, Any]]:
    return {
        d.file: json.loads((ROOT / obs.DASHBOARDS_DIR / d.file).read_text(encoding="utf-8"))
        for d in obs.DASHBOARDS
    }


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lowercase, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in markdown.splitlines():
        if m := re.match(r"#{1,6} +(.+?) *#*$", line):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_committed_files_are_what_the_code_generates() -> None:
    stale = [
        rel
        for rel, text in obs.render().items()
        if not (ROOT / rel).exists() or (ROOT / rel).read_text(encoding="utf-8") != text
    ]
    assert not stale, f"stale: {stale}; run `relay deploy render`"


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", obs.ALERTS], ["test", "rules", obs.ALERTS_TEST]):
        r = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"


def test_every_alert_has_a_test_that_fires_it_and_one_that_stays_quiet() -> None:
    fired, quiet = set(), set()
    for group in _load(obs.ALERTS_TEST)["tests"]:
        for check in group["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in _rules()}
    assert names == fired
    assert names <= quiet


def test_every_alert_says_what_happened_and_links_its_runbook() -> None:
    anchors = _anchors(OPERATIONS.read_text(encoding="utf-8"))
    rules = _rules()
    assert len(rules) >= 10
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        notes = rule["annotations"]
        assert notes["summary"].strip(), name
        assert notes["description"].strip(), name
        url, _, anchor = notes["runbook_url"].partition("#")
        assert url == obs.DOCS, name
        assert anchor in anchors, f"{name}: docs/operations.md has no heading with the anchor #{anchor}"


def test_every_role_is_watched_for_being_down_or_missing() -> None:
    exprs = {r["alert"]: r["expr"] for r in _rules()}
    for role in roles():
        job = obs.scrape_job(role)
        assert f'absent(up{{job="{job}"}})' in exprs["RelayProcessMissing"]
        assert re.search(rf'job=~"[^"]*\b{re.escape(job)}\b', exprs["RelayProcessDown"]), job


# Metrics of libraries the queries use (FastStream's KafkaPrometheusMiddleware in the normalizer).
LIBRARY = {"faststream_received_processed_messages_total": ("app_name", "broker", "handler", "status")}


def _declared() -> dict[str, tuple[str, ...]]:
    """Every sample name the project's metrics export -> the metric's labels."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    out: dict[str, tuple[str, ...]] = dict(LIBRARY)
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind, name, labels = value._type, value._name, tuple(value._labelnames)
            for suffix in suffixes.get(kind, ("",)):
                out[name + suffix] = labels
    return out


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel, dashboard variable and alert."""
    out = [(f"alert {r['alert']}", r["expr"]) for r in _rules()]
    for file, d in _dashboards().items():
        for panel in d["panels"]:
            out.extend((f"{file}: {panel['title']}", t["expr"]) for t in panel["targets"])
        for var in d["templating"]["list"]:
            if var["type"] == "query":
                out.append((f"{file}: ${var['name']}", var["definition"]))
    return out


def test_queries_name_only_declared_metrics_and_their_labels() -> None:
    declared = _declared()
    generic = {"le", "job", "instance"}
    for where, expr in _queries():
        names = set(re.findall(r"\brelay_[a-z_]+", expr))
        unknown = names - set(declared)
        assert not unknown, f"{where}: {sorted(unknown)} not declared in services/common/metrics.py"
        others = set(re.findall(r"\b[a-z]+_[a-z_]+_total\b", expr)) - names
        assert others <= set(LIBRARY), f"{where}: {sorted(others - set(LIBRARY))} is no known metric"
        known_labels = generic.union(*(declared[n] for n in names | others))
        for name, matchers in re.findall(r"\b(relay_[a-z_]+)\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert used <= set(declared[name]) | generic, (
                f"{where}: {name} has no label {used - set(declared[name])}"
            )
        for clause in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            used = {label.strip() for label in clause.split(",") if label.strip()}
            assert used <= known_labels, f"{where}: no metric of the query has {sorted(used - known_labels)}"
        if m := re.match(r"label_values\((\w+), *(\w+)\)", expr):
            assert m.group(2) in declared[m.group(1)], where


def test_dashboards_are_grafana_models_with_a_query_in_every_panel() -> None:
    uids = set()
    for file, d in _dashboards().items():
        assert d["schemaVersion"] >= 38, file
        assert d["uid"], file
        assert d["uid"] not in uids, file
        uids.add(d["uid"])
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["current"]["value"] == obs.DATASOURCE_UID
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), file
        for panel in d["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    delivery = _dashboards()["relay-delivery.json"]
    (target,) = [v for v in delivery["templating"]["list"] if v["name"] == "target"]
    assert target["definition"] == "label_values(relay_deliveries_total, target)"
    assert all("$target" in t["expr"] for p in delivery["panels"] for t in p["targets"])


def test_kubernetes_gets_the_same_rules_and_dashboards() -> None:
    (rule,) = list(yaml.safe_load_all((ROOT / obs.PROMETHEUS_RULE).read_text(encoding="utf-8")))
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["metadata"]["name"] == "klientiks-relay"
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "klientiks-relay"
    assert rule["spec"]["groups"] == _load(obs.ALERTS)["groups"]
    assert [g["name"] for g in rule["spec"]["groups"]] == ["klientiks-relay"]

    maps = list(yaml.safe_load_all((ROOT / obs.DASHBOARD_CONFIGMAPS).read_text(encoding="utf-8")))
    assert len(maps) == len(obs.DASHBOARDS)
    for cm, d in zip(maps, obs.DASHBOARDS, strict=True):
        assert (cm["apiVersion"], cm["kind"]) == ("v1", "ConfigMap")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"] == {d.file: (ROOT / obs.DASHBOARDS_DIR / d.file).read_text(encoding="utf-8")}


def test_compose_grafana_provisioning() -> None:
    (source,) = _load(obs.GRAFANA_DATASOURCE)["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    (provider,) = _load(obs.GRAFANA_DASHBOARD_PROVIDER)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
