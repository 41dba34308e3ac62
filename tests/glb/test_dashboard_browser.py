"""`glb dashboard` in a real browser: Debian's chromium, headless, driven by selenium, against a
live deployment: the real `glb director` of tests/director/control/test_listing.py (real servers on
127.0.0.x, a real redis-server), a real `glb dnsfront` on loopback and the real `glb dashboard`
process, all for the module.

With ``GLB_DASHBOARD_SCREENSHOTS=DIR`` the run saves the page's screenshots there (docs/images
holds the ones the README links, made so); otherwise into the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from glb.state import server_target
from tests.director.control.test_listing import (  # noqa: F401  (fixtures)
    OPERATOR_TOKEN as TOKEN,
    ROOT,
    director_lab,
    free_port,
    load_state,
    running_director,
    servers_of,
    wait_for,
)
from tests.environment import binary_unavailable, needs
from tests.processes import terminate


def _selenium_unavailable() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip, in the test extras: bash scripts/setup installs it)"
    return None


pytestmark = [
    needs(binary_unavailable("chromium")),
    needs(binary_unavailable("chromedriver", "chromium-driver")),
    needs(_selenium_unavailable()),
    pytest.mark.timeout(300),
]

SHOWN = 2.0
"""Seconds within which a state change in Redis must show on the page (issue 14)."""
SETTLE = 15.0
"""Generous bound for things that do not measure the dashboard (health checks, process start)."""


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class Proc:
    """A `glb ...` subprocess with its log; stopped by SIGTERM, and its log checked for tracebacks."""

    def __init__(self, log: Path, *args: str):
        self.log_path = log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "glb.cli", *args], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.proc.args[3:5]} exited with {self.proc.returncode}: "
                                 + self.log_path.read_text()[-2000:])
        return True

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()
        text = self.log_path.read_text()
        assert "Traceback" not in text, text


class Deployment:
    def __init__(self, lab, config: Path, dns_port: int, dash_port: int, tmp: Path):
        self.lab, self.config, self.dns_port, self.dash_port, self.tmp = lab, config, dns_port, dash_port, tmp
        self.url = f"http://127.0.0.1:{dash_port}/"
        self.dashboard: Proc | None = None

    def start_dashboard(self) -> None:
        self.dashboard = Proc(self.tmp / f"dashboard-{time.monotonic_ns()}.log", "dashboard", "--config",
                              str(self.config), "--listen", f"127.0.0.1:{self.dash_port}")

        def synced() -> bool:
            self.dashboard.alive()
            try:
                return _get(self.url + "healthz")["redis_connected"]
            except OSError:
                return False

        wait_for(synced, SETTLE)

    def stop_dashboard(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None


@pytest.fixture(scope="module")
def deployment(running_director, tmp_path_factory) -> Iterator[Deployment]:
    """The director's config plus a dnsfront on loopback; dnsfront and the dashboard running."""
    lab = running_director
    tmp = tmp_path_factory.mktemp("dashboard")
    dns_port, dns_status, dash_port = free_port(), free_port(), free_port()
    config = tmp / "glb.yaml"
    config.write_text(lab.config.read_text() + f"""
dnsfront: {{listen: ["127.0.0.1:{dns_port}"], status_listen: "127.0.0.1:{dns_status}", workers: 1}}
""")
    dep = Deployment(lab, config, dns_port, dash_port, tmp)
    dnsfront = Proc(tmp / "dnsfront.log", "dnsfront", "--config", str(config))
    try:
        wait_for(lambda: dnsfront.alive() and _get(f"http://127.0.0.1:{dns_status}/status") is not None, SETTLE)
        dep.start_dashboard()
        yield dep
    finally:
        dep.stop_dashboard()
        dnsfront.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    from deploy.lab.screenshots import chromium

    driver = chromium(str(tmp_path_factory.mktemp("chromium")))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(deployment, director_lab, browser):
    """The page freshly loaded at the baseline (no overrides, every backend healthy), signed out."""
    if deployment.dashboard is None:
        deployment.start_dashboard()
    browser.get(deployment.url)
    browser.execute_script("sessionStorage.clear()")
    browser.get(deployment.url)
    wait_until(browser, lambda d: badge(d, "live") == "live", SETTLE)
    yield browser


def screenshot(driver, tmp: Path, name: str) -> None:
    out = Path(os.environ.get("GLB_DASHBOARD_SCREENSHOTS") or tmp)
    out.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out / f"dashboard-{name}.png"))


# --------------------------------------------------------------------------
# Reading the page


def wait_until(driver, condition, timeout: float):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def text(driver, selector: str) -> str:
    """An element's text, read again if the page replaced the element meanwhile (the names table and
    a site's facts are rebuilt when they change, e.g. every second for a heartbeat age)."""
    return wait_until(driver, lambda d: css(d, selector).text, 5)


def badge(driver, element_id: str) -> str:
    return css(driver, f"#{element_id}").text


def server_row(driver, key: str):
    return css(driver, f'tr[data-server="{key}"]')


def server_state(driver, key: str) -> str:
    return server_row(driver, key).find_element("css selector", ".state").text


def timeline(driver) -> list[str]:
    return [li.text for li in driver.find_elements("css selector", "#timeline li")]


def sign_in(driver, who: str, token: str) -> None:
    css(driver, "#sign-in").click()
    css(driver, "#who").send_keys(who)
    css(driver, "#token").send_keys(token)
    css(driver, "#sign-in-ok").click()
    wait_until(driver, lambda d: css(d, "#signed-in").text == f"signed in as {who}", 5)


def act(driver, row_key: str, button: str, why: str, weight: str | None = None) -> None:
    server_row(driver, row_key).find_element("css selector", button).click()
    wait_until(driver, lambda d: css(d, "#action-dialog").get_attribute("open") is not None, 5)
    if weight is not None:
        css(driver, "#weight").send_keys(weight)
    css(driver, "#why").send_keys(why)
    css(driver, "#action-ok").click()


def message(driver, timeout: float = SETTLE) -> str:
    wait_until(driver, lambda d: css(d, "#message").is_displayed(), timeout)
    return css(driver, "#message").text


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# --------------------------------------------------------------------------
# The tests


def test_page_renders_every_site_service_and_server(page, deployment):
    lab = deployment.lab
    mail_port = lab.status()["services"][1]["real_servers"][0]["port"]
    for site in ("dc1", "dc2"):
        assert css(page, f"#site-{site} h3").text == site
    assert badge(page, "site-dc1 .site-state") == "up"
    assert badge(page, "site-dc2 .site-state") == "no snapshot"
    assert [e.get_attribute("data-service") for e in page.find_elements("css selector", "#site-dc1 .service")] \
        == ["web", "mail"]
    expected = {"dc1/web/127.0.0.1": "up", "dc1/web/127.0.0.2": "up", "dc1/web/127.0.0.3": "down",
                f"dc1/mail/127.0.0.5:{mail_port}": "up", "dc2/web/10.2.0.11": "unknown"}
    for key, state in expected.items():
        assert server_state(page, key) == state, key
    row = server_row(page, "dc1/web/127.0.0.1")
    assert row.find_element("css selector", ".weight").text == "3"
    assert row.find_element("css selector", ".check").text.startswith("HTTP 200, body matched")  # the last check
    facts = text(page, "#site-dc1 .site-facts")
    assert "test-director" in facts
    assert "3/4 servers up" in facts  # over both services
    # The names table: what DNS answers now, from dnsfront's policy code (dc2 has no snapshot).
    answers = text(page, 'tr[data-name="app.example.net. A"] .answers')
    assert answers.startswith("dc1 100%"), answers
    # Charts: one per series family, drawn by uPlot once samples arrive; dnsfront's queries/s among them.
    from dns import message as dnsmessage, query

    for _ in range(20):
        query.udp(dnsmessage.make_query("app.example.net", "A"), "127.0.0.1", port=deployment.dns_port, timeout=2)
    series = f"dns:127.0.0.1:{dns_status_port(deployment)}"
    wait_for(lambda: max(v or 0 for v in _get(deployment.url + "api/state")["samples"]["series"].get(series, [0])) > 0,
             SETTLE)
    wait_until(page, lambda d: len(d.find_elements("css selector", "#charts .uplot")) == 6, SETTLE)
    legend = text(page, '[data-chart="dns:"]')
    assert series.removeprefix("dns:") in legend, legend
    assert console_errors(page) == []  # no CSP violation, no script error


def dns_status_port(deployment) -> int:
    from glb import config as configmod

    return configmod.load(deployment.config).dnsfront.status_listen.port


def test_a_server_going_down_shows_within_2s(page, deployment):
    lab = deployment.lab
    lab.backends["127.0.0.2"].healthy = False

    def published_down() -> bool:
        srv = load_state(lab.redis_url).sites["dc1"].service("web").real_server("127.0.0.2", 0)
        return srv.state == "down"

    wait_for(published_down, SETTLE)  # the director's checks and publication: not the dashboard's part
    wait_until(page, lambda d: server_state(d, "dc1/web/127.0.0.2") == "down", SHOWN)
    wait_until(page, lambda d: any("server down" in t and "dc1/web/127.0.0.2: up -> down" in t for t in timeline(d)),
               SHOWN)
    screenshot(page, deployment.tmp, "server-down")
    lab.backends["127.0.0.2"].healthy = True
    wait_until(page, lambda d: server_state(d, "dc1/web/127.0.0.2") == "up", SETTLE)
    assert any("server up" in t and "dc1/web/127.0.0.2: down -> up" in t for t in timeline(page))


def test_a_drain_clicked_in_the_page_reaches_redis_and_the_director(page, deployment):
    lab = deployment.lab
    sign_in(page, "alice", TOKEN)
    assert page.execute_script("return sessionStorage.getItem('glb.token')") == TOKEN
    assert TOKEN not in page.current_url
    act(page, "dc1/web/127.0.0.2", ".drain", "kernel upgrade")
    assert message(page).startswith("Done: drained server dc1/web/127.0.0.2"), message(page)
    held = load_state(lab.redis_url).overrides[server_target("dc1", "web", "127.0.0.2", 0)]
    assert (held.drain, held.who, held.why) == (True, "alice", "kernel upgrade")
    wait_for(lambda: servers_of(lab.status())["web/127.0.0.2"]["state"] == "draining")
    wait_until(page, lambda d: server_state(d, "dc1/web/127.0.0.2") == "draining", SETTLE)
    assert server_row(page, "dc1/web/127.0.0.2").find_element("css selector", ".drain").text == "undrain"
    wait_until(page, lambda d: any('drained server dc1/web/127.0.0.2 — by alice: "kernel upgrade"' in t
                                   for t in timeline(d)), SHOWN)

    # A weight, then the whole site, then back: every one through the page.
    act(page, "dc1/web/127.0.0.1", ".set-weight", "bigger box", weight="7")
    assert message(page).startswith("Done: server dc1/web/127.0.0.1: weight override set to 7")
    wait_until(page, lambda d: server_row(d, "dc1/web/127.0.0.1").find_element("css selector", ".weight").text == "7*",
               SETTLE)
    css(page, "#site-dc1 .site-drain").click()
    css(page, "#why").send_keys("maintenance")
    css(page, "#action-ok").click()
    assert message(page).startswith("Done: drained site dc1")
    wait_until(page, lambda d: badge(d, "site-dc1 .site-state") == "drained", SETTLE)
    wait_until(page, lambda d: "dc1 - (drained)" in css(d, 'tr[data-name="app.example.net. A"] .answers').text, SETTLE)
    screenshot(page, deployment.tmp, "overview")

    css(page, "#site-dc1 .site-drain").click()
    css(page, "#why").send_keys("done")
    css(page, "#action-ok").click()
    wait_until(page, lambda d: badge(d, "site-dc1 .site-state") == "up", SETTLE)
    act(page, "dc1/web/127.0.0.2", ".drain", "kernel upgraded")
    wait_until(page, lambda d: server_state(d, "dc1/web/127.0.0.2") == "up", SETTLE)
    act(page, "dc1/web/127.0.0.1", ".set-weight", "back to normal", weight="")
    wait_until(page, lambda d: server_row(d, "dc1/web/127.0.0.1").find_element("css selector", ".weight").text == "3",
               SETTLE)
    assert load_state(lab.redis_url).overrides == {}
    assert console_errors(page) == []


def test_a_wrong_token_is_refused_with_a_clear_message(page, deployment):
    lab = deployment.lab
    sign_in(page, "mallory", "not-the-admin-token-at-all")
    act(page, "dc1/web/127.0.0.2", ".drain", "just because")
    text = message(page)
    assert text.startswith("Token refused: director of site dc1 at 127.0.0.1:"), text
    assert "rejected the token (401)" in text
    assert css(page, "#sign-in").is_displayed()  # the refused token is forgotten
    assert page.execute_script("return sessionStorage.getItem('glb.token')") is None
    assert load_state(lab.redis_url).overrides == {}
    wait_until(page, lambda d: any("action refused" in t and "by mallory" in t for t in timeline(d)), SHOWN)
    screenshot(page, deployment.tmp, "wrong-token")
    log = deployment.dashboard.log_path.read_text()
    assert "not-the-admin-token-at-all" not in log and TOKEN not in log


def test_redis_outage_shows_the_last_state_as_stale(page, deployment, redis_server):
    redis_server.stop()
    try:
        wait_until(page, lambda d: css(d, "#stale").is_displayed(), SETTLE)
        assert css(page, "#stale").text.startswith("STALE: Redis is unreachable; showing the last state as of ")
        assert badge(page, "live") == "stale"
        assert server_state(page, "dc1/web/127.0.0.1") == "up"  # the last state, still shown
        screenshot(page, deployment.tmp, "redis-outage")
    finally:
        redis_server.start()
    wait_until(page, lambda d: not css(d, "#stale").is_displayed() and badge(d, "live") == "live", SETTLE)


def test_the_page_survives_a_dashboard_restart(page, deployment):
    deployment.stop_dashboard()
    wait_until(page, lambda d: css(d, "#stale").text.startswith("The dashboard is unreachable"), SETTLE)
    deployment.start_dashboard()
    # EventSource reconnects by itself; no reload.
    wait_until(page, lambda d: badge(d, "live") == "live" and not css(d, "#stale").is_displayed(), SETTLE)
    assert server_state(page, "dc1/web/127.0.0.1") == "up"
