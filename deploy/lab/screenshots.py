"""`python -m deploy.lab.screenshots`: the dashboard's screenshots in docs/, taken from the running lab.

With the lab up (``python -m deploy.lab up``), this drives traffic from the
lab's client (HTTP through the VIPs, DNS through the resolver), stops one real
server of dc1, drains one of dc2 with ``glb drain`` (who and why land in the
timeline) and has Debian's chromium (headless, through selenium) save the
page; then it undoes both. The pictures are the page as it was, not drawn.

    python -m deploy.lab.screenshots [--prefix glb-lab-] [--state-dir /run/glb-lab] [--dashboard-port 9180]
                                     [--out docs/images]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from deploy.lab import probe
from deploy.lab import topology as topo
from deploy.lab.lab import DASHBOARD_PORT, DEFAULT_PREFIX, DEFAULT_STATE_DIR, ROOT, Lab, glb_command
from deploy.lab.net import LabError

NAME = f"app.{topo.ZONE}"


def chromium(profile: str, width: int = 1400, height: int = 1900):
    """Debian's chromium, headless, driven by selenium (the same set-up as the dashboard's browser tests)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _traffic(lab: Lab, stop: threading.Event) -> None:
    with lab.inside("client"):
        while not stop.is_set():
            probe.request(topo.RESOLVER, NAME)
            for address in topo.DNSFRONTS.values():
                probe.resolve(address, NAME, rd=False, timeout=0.5)
            time.sleep(0.02)


def _full_page(driver, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, height))
    driver.save_screenshot(str(path))


def take(lab: Lab, out: Path, log=print) -> list[Path]:
    if not lab.is_up():
        raise LabError("the lab is not up: run 'python -m deploy.lab up' first")
    out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    traffic = threading.Thread(target=_traffic, args=(lab, stop), daemon=True)
    traffic.start()
    taken = []
    glb = glb_command() + ["--log-level", "warning"]
    drain = ["--config", str(lab.config_path), "--site", "dc2", "--service", "web", "--server", "10.2.0.12",
             "--who", "alice"]
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium(profile)
        try:
            driver.get(lab.dashboard_url)
            log("traffic for 30 s, so the charts have something to show")
            time.sleep(30)
            log("stopping dc1-rs1's HTTP server; draining dc2's 10.2.0.12 with glb drain")
            lab.stop_process("dc1-rs1-httpd")
            lab.run_in("dc2-director", glb + ["drain", *drain, "--reason", "kernel upgrade"], what="glb drain")
            time.sleep(10)
            taken.append(out / "dashboard-lab.png")
            _full_page(driver, taken[-1])
            log(f"saved {taken[-1]}")
        finally:
            driver.quit()
            stop.set()
            traffic.join(10)
            lab.restart_process("dc1-rs1-httpd")
            lab.run_in("dc2-director", glb + ["undrain", *drain, "--reason", "done"], what="glb undrain")
    return taken


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.lab.screenshots", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default=DEFAULT_PREFIX)
    ap.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    ap.add_argument("--dashboard-port", type=int, default=DASHBOARD_PORT)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args(argv)
    lab = Lab(prefix=args.prefix, state_dir=args.state_dir, dashboard_port=args.dashboard_port)
    try:
        take(lab, args.out)
    except LabError as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
