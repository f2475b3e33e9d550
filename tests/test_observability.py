"""The observability pack in deploy/, checked by Prometheus itself (Debian's `prometheus`
package, installed by `make sysdeps`), and the metrics it needs from a node.

1. `promtool check rules` and `promtool test rules` on deploy/prometheus/alerts.yml, whose
   unit tests show every alert both firing and not firing.
2. `promtool check config` on the example deploy/prometheus/prometheus.yml.
3. The series the pack reads exist from a node's start, at zero: engines, upstream
   reasons, token rejection reasons, rate-limit scopes, one circuit gauge per upstream,
   and `nearvoice_ready`; the circuit gauge follows a real upstream's breaker.
4. A real Prometheus scrapes a real edge <- shield <- origin stack (processes on loopback,
   started as tests/test_stack.py starts them) under a short load of signed URLs; then
   every query of every panel of deploy/grafana/nearvoice.json is evaluated through
   Prometheus' HTTP API and must return data. Grafana itself is not installed here: this
   evaluation is what proves that no panel is empty or misnamed.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from nearvoice.edge.app import create_app
from nearvoice.edge.cache.fill import FillFailed
from nearvoice.edge.metrics import TOKEN_REJECTION_REASONS, LimitScope, Metrics
from nearvoice.edge.producer import UpstreamReason
from nearvoice.edge.upstream import Upstreams, UpstreamSettings
from tests.support import make_config, make_keyring, scrape, sign, wait_ready
from tests.test_stack import (
    EDGE_CONFIG,
    KEYRING,
    NodeProcess,
    free_port,
    heart,
    http,
    joe,
    origin_config,
    running,
    start_node,
    stop_process,
)
from tests.test_stack import wait_ready as wait_nodes_ready

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
EXAMPLE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "nearvoice.json"
TIERS = ("edge", "shield", "origin")
PROMETHEUS_MISSING = (
    "prometheus and promtool are not installed, and these tests run them as the real "
    "peer: run `make sysdeps` (Debian package prometheus)"
)
PROMETHEUS_START = 30.0  # seconds for Prometheus to answer /-/ready
SCRAPE_WAIT = 20.0  # seconds for Prometheus to have scraped what the nodes report
RATE_INTERVAL = "1m"  # what $__rate_interval stands for: a window over the whole test
# What Grafana substitutes in the panels' queries; "All" is the variables' `.*`.
VARIABLES = {"$__rate_interval": RATE_INTERVAL, "$tier": ".*", "$instance": ".*"}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(PROMETHEUS_MISSING, pytrace=False)
    return found


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def alert_names() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"]]


def panel_targets() -> list[tuple[str, str]]:
    """(panel title, query) of every target of every panel, rows' nested panels included."""
    found = []
    panels = list(json.loads(DASHBOARD.read_text())["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        found.extend((panel["title"], target["expr"]) for target in panel.get("targets", []))
    return found


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a template variable the test does not know: {expr}"
    return expr


def value_of(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


# -- 1, 2. promtool ---------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in done.stdout


def test_alert_rules_cover_the_contracted_conditions() -> None:
    assert set(alert_names()) == {
        "NearvoiceHitRatioLow",
        "NearvoiceErrorRatioHigh",
        "NearvoiceFirstByteSlow",
        "NearvoiceRenderQueueSaturated",
        "NearvoiceUpstreamCircuitOpen",
        "NearvoiceStoreErrors",
        "NearvoiceNodeNotReady",
    }


def test_alert_unit_tests_pass() -> None:
    done = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for name in alert_names():
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == name]
        assert [] in expected, f"{name} is never tested not firing"
        assert any(expected), f"{name} is never tested firing"


def test_alert_unit_tests_fail_when_a_rule_changes(tmp_path: Path) -> None:
    """The unit tests bite: the same tests against rules whose budgets were relaxed fail."""
    relaxed = ALERTS.read_text().replace("> 0.01", "> 0.5").replace("< 0.5", "< 0.1")
    assert relaxed != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(relaxed)
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    done = promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert done.returncode != 0
    assert "NearvoiceErrorRatioHigh" in done.stdout + done.stderr
    assert "NearvoiceHitRatioLow" in done.stdout + done.stderr


def test_example_prometheus_config_passes_promtool_check(tmp_path: Path) -> None:
    """The example as shipped: its rule file is found beside it, wherever both are put."""
    for path in (EXAMPLE_CONFIG, ALERTS):
        shutil.copy(path, tmp_path / path.name)
    done = promtool("check", "config", str(tmp_path / EXAMPLE_CONFIG.name))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in done.stdout


def test_example_prometheus_config_labels_each_job_with_its_tier() -> None:
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    tiers = {
        job["job_name"]: {group["labels"]["tier"] for group in job["static_configs"]}
        for job in config["scrape_configs"]
    }
    assert sorted(tier for found in tiers.values() for tier in found) == sorted(TIERS)
    assert config["rule_files"] == [ALERTS.name]


def test_dashboard_takes_its_datasource_and_tiers_from_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "tier" in variables["tier"]["query"]["query"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


# -- 3. series at zero from the start ----------------------------------------------------------


def test_a_new_node_is_not_ready_and_has_every_scope_and_reason_at_zero() -> None:
    text = Metrics().render().decode()
    assert value_of(text, "nearvoice_ready") == 0
    for scope in LimitScope:
        assert value_of(text, "nearvoice_rate_limited_total", scope=scope.value) == 0
    for reason in TOKEN_REJECTION_REASONS:
        assert value_of(text, "nearvoice_token_rejections_total", reason=reason) == 0


async def test_a_started_node_exposes_its_series_at_zero_and_is_ready(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    upstreams = ("http://127.0.0.1:9", "http://127.0.0.1:10")  # never asked here
    app = create_app(make_config(tmp_path, upstreams=upstreams), make_keyring(), engines=[])
    client = await aiohttp_client(app)
    await wait_ready(client)
    text = await scrape(client)
    assert value_of(text, "nearvoice_ready") == 1
    for reason in UpstreamReason:
        assert value_of(text, "nearvoice_upstream_requests_total", reason=reason.value) == 0
    for base in upstreams:
        assert value_of(text, "nearvoice_upstream_circuit_open", upstream=base) == 0
    assert value_of(text, "nearvoice_store_errors_total") == 0


@dataclass
class Flaky:
    """An upstream that answers 503 until told to recover, counting what it was asked."""

    healthy: bool = False
    asked: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.asked += 1
        if self.healthy:
            return web.Response(body=b"audio", content_type="audio/wav")
        return web.json_response({"error": "render_failed"}, status=503)


async def test_circuit_gauge_follows_the_breaker_of_a_real_upstream(
    aiohttp_server: AiohttpServer,
) -> None:
    flaky = Flaky()
    app = web.Application()
    app.router.add_get("/{tail:.*}", flaky.handle)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    settings = UpstreamSettings(failure_threshold=2, open_seconds=0.0, retries=1)
    upstreams = Upstreams((base,), make_keyring(), settings)
    metrics = Metrics()
    upstreams.watch_circuits(metrics.circuit)

    def circuit() -> float | None:
        return value_of(metrics.render().decode(), "nearvoice_upstream_circuit_open", upstream=base)

    await upstreams.start()
    try:
        assert circuit() == 0
        with pytest.raises(FillFailed):
            async with upstreams.fetch("k" * 64, "/v1/speech/x.wav"):
                pass
        assert flaky.asked == 2  # two failures: the threshold
        assert circuit() == 1
        flaky.healthy = True  # open_seconds=0: the next request is the half-open trial
        async with upstreams.fetch("k" * 64, "/v1/speech/x.wav") as fetched:
            assert [chunk async for chunk in fetched.chunks()] == [b"audio"]
        assert circuit() == 0
    finally:
        await upstreams.close()


# -- 4. a real Prometheus over a real stack ------------------------------------------------------

PANEL_TARGETS = panel_targets()
PANEL_IDS = [f"{title}-{i}" for i, (title, _) in enumerate(PANEL_TARGETS)]


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        answer = http(f"{self.base}/api/v1/{path}?{query}", timeout=10)
        assert answer.status == 200, answer.body[:500]
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, what: str, limit: float = SCRAPE_WAIT) -> None:
        """Polls until the instant query `expr` returns a series (a PromQL condition)."""
        deadline = time.monotonic() + limit
        while not self.query(expr):
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus did not see {what} within {limit:.0f} s ({expr})")
            time.sleep(0.2)


def prometheus_config(targets: dict[str, str]) -> dict[str, Any]:
    """The example config, pointed at `targets` (tier -> host:port), scraping every second,
    with the alert rules at their path in the repository."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = [targets[group["labels"]["tier"]]]
    return config


@contextlib.contextmanager
def prometheus(where: Path, targets: dict[str, str]) -> Iterator[Prometheus]:
    where.mkdir(parents=True, exist_ok=True)
    config = where / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(targets)))
    done = promtool("check", "config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    for attempt in range(3):
        port = free_port()
        log = where / f"prometheus-{attempt}.log"
        argv = [
            tool("prometheus"), f"--config.file={config}",
            f"--storage.tsdb.path={where / f'data-{attempt}'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        server = Prometheus(proc, port, log)
        try:
            deadline = time.monotonic() + PROMETHEUS_START
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if http(f"{server.base}/-/ready", timeout=2).status == 200:
                        break
                time.sleep(0.1)
            else:
                if "address already in use" in log.read_text():
                    continue
                pytest.fail(f"prometheus did not start:\n{log.read_text()[-3000:]}")
            yield server
            return
        finally:
            stop_process(proc)
    pytest.fail("prometheus found no free port in 3 tries")


@dataclass
class Observed:
    prometheus: Prometheus


LOADED = (
    'sum(nearvoice_requests_total{tier="edge", result="hit"}) >= 4',
    'sum(nearvoice_requests_total{tier="edge", result="miss"}) >= 3',
    'sum(nearvoice_token_rejections_total{tier="edge", reason="bad_signature"}) >= 1',
    'sum(nearvoice_upstream_requests_total{tier="edge", reason="no_engine"}) >= 1',
    'sum(nearvoice_cache_objects{tier="edge"}) >= 3',
    'sum(nearvoice_requests_total{tier="origin", result="miss"}) >= 1',
    'sum(nearvoice_synth_total{tier="origin", engine="piper"}) >= 1',
)
"""PromQL conditions that hold once Prometheus has scraped everything `load` caused."""


def load(edge: NodeProcess) -> None:
    """Misses rendered at the edge (heart) and fetched through shield and origin (joe), hits
    of each, a Range hit, and a URL with a forged signature (LOADED: what they cause)."""
    urls = [edge.base + sign(KEYRING, spec) for spec in (heart(), heart(), joe())]
    for url in urls:  # misses
        answer = http(url)
        assert answer.status == 200, answer.body[:300]
    for url in urls:
        # The body's last byte leaves before the commit; a HEAD then waits for it.
        assert http(url, method="HEAD").status == 200
    for url in urls:  # hits
        assert http(url).status == 200
    ranged = http(urls[0], headers={"Range": "bytes=0-999"})
    assert ranged.status == 206
    assert len(ranged.body) == 1000
    forged = re.sub(r"sig=[^&]+", "sig=AAAA", urls[1])
    rejected = http(forged)
    assert rejected.status == 403
    assert rejected.json()["error"] == "bad_signature"


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    where = tmp_path_factory.mktemp("observed")
    nodes: list[NodeProcess] = []
    with running(nodes):
        origin = start_node(
            "origin", where, config=origin_config("http://127.0.0.1:1", where / "objects")
        )
        nodes.append(origin)
        shield = start_node("shield", where, upstreams=[origin.base])
        nodes.append(shield)
        edge = start_node("edge", where, upstreams=[shield.base], config=EDGE_CONFIG)
        nodes.append(edge)
        wait_nodes_ready(origin, shield, edge)
        targets = {node.role: f"127.0.0.1:{node.port}" for node in nodes}
        with prometheus(where / "prometheus", targets) as server:
            server.wait_for(
                'count(nearvoice_ready{tier=~"edge|shield|origin"} == 1) == 3',
                "every tier ready",
            )
            load(edge)
            # Prometheus has scraped the load once it counts what the load must have
            # caused (a node counts an answer just after its last byte, so its own
            # /metrics read at once could still be a step behind).
            for expr in LOADED:
                server.wait_for(expr, "the load")
            yield Observed(server)


@pytest.mark.slow
class TestPrometheusOverTheStack:
    """A real Prometheus scraping edge <- shield <- origin after a short load."""

    def test_every_tier_is_scraped_with_its_tier_label(self, observed: Observed) -> None:
        up = observed.prometheus.query('up{job=~"nearvoice-.*"}')
        assert sorted(series["metric"]["tier"] for series in up) == sorted(TIERS)
        assert all(series["value"][1] == "1" for series in up)

    def test_alert_rules_load_and_evaluate_cleanly(self, observed: Observed) -> None:
        groups = observed.prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert sorted(rule["name"] for rule in rules) == sorted(alert_names())
        deadline = time.monotonic() + SCRAPE_WAIT
        while any(rule["health"] == "unknown" for rule in rules):  # not yet evaluated
            assert time.monotonic() < deadline, "the rules were never evaluated"
            time.sleep(0.2)
            groups = observed.prometheus.api("rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
        assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    @pytest.mark.parametrize(("title", "expr"), PANEL_TARGETS, ids=PANEL_IDS)
    def test_every_dashboard_query_returns_data(
        self, observed: Observed, title: str, expr: str
    ) -> None:
        result = observed.prometheus.query(substitute(expr))
        assert result, f"panel {title!r} is empty: {substitute(expr)}"

    def test_request_hit_ratio_panel_shows_the_edge_hits(self, observed: Observed) -> None:
        ratio = by_label(observed, "Request hit ratio by tier", "tier")
        assert 0 < ratio["edge"] < 1  # hits and misses both

    def test_origin_offload_panel_is_a_fraction(self, observed: Observed) -> None:
        offload = by_label(observed, "Origin offload", "", target=0)
        assert 0 < offload[""] < 1  # the origin saw one joe miss of the edge's requests

    def test_upstream_panel_shows_the_edge_sending_joe_upstream(self, observed: Observed) -> None:
        reasons = by_labels(observed, "Upstream requests by reason", ("tier", "reason"))
        assert reasons[("edge", "no_engine")] > 0
        assert reasons[("edge", "overload")] == 0

    def test_render_panel_shows_hibari_at_the_edge_and_piper_at_the_origin(
        self, observed: Observed
    ) -> None:
        renders = by_labels(observed, "Renders per second by engine", ("tier", "engine"))
        assert renders[("edge", "hibari")] > 0
        assert renders[("origin", "piper")] > 0
        assert renders[("origin", "hibari")] == 0  # created at zero, never used

    def test_rejection_panel_shows_the_forged_signature(self, observed: Observed) -> None:
        reasons = by_labels(observed, "Token rejections by reason", ("tier", "reason"))
        assert reasons[("edge", "bad_signature")] > 0
        assert reasons[("edge", "expired")] == 0

    def test_first_byte_panels_have_hit_quantiles(self, observed: Observed) -> None:
        for title in ("First byte p50 by result", "First byte p99 by result"):
            quantiles = by_labels(observed, title, ("tier", "result"))
            assert 0 < quantiles[("edge", "hit")] < math.inf

    def test_cache_fill_panel_counts_the_edge_objects(self, observed: Observed) -> None:
        objects = by_labels(observed, "Cache fill (objects)", ("tier",))
        assert objects[("edge",)] == 3  # two heart lines and one joe line

    def test_nodes_ready_panel_counts_every_tier(self, observed: Observed) -> None:
        ready = by_label(observed, "Nodes ready", "tier")
        assert ready == {"edge": 1, "shield": 1, "origin": 1}

    def test_every_series_the_node_exports_at_start_reaches_prometheus(
        self, observed: Observed
    ) -> None:
        """Rate-limit scopes and circuit gauges exist before their first event."""
        scopes = observed.prometheus.query('nearvoice_rate_limited_total{tier="edge"}')
        assert sorted(s["metric"]["scope"] for s in scopes) == sorted(s.value for s in LimitScope)
        circuits = observed.prometheus.query("nearvoice_upstream_circuit_open")
        assert sorted(s["metric"]["tier"] for s in circuits) == ["edge", "shield"]
        assert all(s["value"][1] == "0" for s in circuits)


def panel_query(title: str, target: int = 0) -> str:
    exprs = [expr for found, expr in panel_targets() if found == title]
    assert exprs, f"no panel titled {title!r}"
    return substitute(exprs[target])


def by_labels(
    observed: Observed, title: str, labels: tuple[str, ...], target: int = 0
) -> dict[tuple[str, ...], float]:
    result = observed.prometheus.query(panel_query(title, target))
    return {
        tuple(series["metric"].get(label, "") for label in labels): float(series["value"][1])
        for series in result
    }


def by_label(observed: Observed, title: str, label: str, target: int = 0) -> dict[str, float]:
    return {key[0]: value for key, value in by_labels(observed, title, (label,), target).items()}
