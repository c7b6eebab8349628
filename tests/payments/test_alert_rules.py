"""The payments alert rules: valid for Prometheus, each alert firing and staying quiet as its
unit tests say (``promtool``), and written against metrics the payments context exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from forecourt.payments import metrics
from tests.conftest import service_missing

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "payments-rules.yml"
RULE_TESTS = RULES_DIR / "payments-rules.test.yml"
ALERTS = {
    "PaymentSuccessRateLow",
    "PaymentOrdersStuckUnknown",
    "PaymentRecoveryBacklog",
    "PaymentProviderSlow",
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        service_missing(
            "promtool not found (apt-get install -y --no-install-recommends prometheus)"
        )
    assert found is not None
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120
    )


def test_promtool_checks_the_rules() -> None:
    done = _run("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = _run("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    (group,) = doc["groups"]
    assert group["name"] == "forecourt-payments"
    return list(group["rules"])


def test_every_alert_has_severity_annotations_and_runbook() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict)
        assert isinstance(annotations, dict)
        assert labels["severity"] in {"warning", "critical"}
        assert annotations["summary"]
        assert "docs/payments.md" in annotations["description"]
        assert annotations["runbook"].startswith("docs/payments.md")


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == ALERTS
    assert quiet == ALERTS


def test_rules_use_only_exported_metrics() -> None:
    registry = CollectorRegistry()
    metrics.register(registry)
    exported = set(re.findall(r"^([a-z_]+)(?:\{| )", generate_latest(registry).decode(), re.M))
    used: set[str] = set()
    for rule in _rules():
        used |= set(re.findall(r"\bforecourt_[a-z_]+", str(rule["expr"])))
    assert used
    assert used <= exported, used - exported


@pytest.mark.parametrize(
    ("label", "allowed"),
    [
        ("method", metrics.METHODS),
        ("outcome", metrics.OUTCOMES),
        ("operation", metrics.OPERATIONS),
    ],
)
def test_rules_match_label_values_the_metrics_take(label: str, allowed: frozenset[str]) -> None:
    for rule in _rules():
        for value in re.findall(rf'\b{label}="([^"]*)"', str(rule["expr"])):
            assert value in allowed
