"""deploy/systemd: the units load cleanly (systemd-analyze verify) and keep their hardening promises."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.environment import binary_unavailable, require

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


DROPIN = UNITS / "glb-director@.service.d" / "kernel-dataplane.conf"
"""What the kernel data plane adds to the director's unit (docs/operations.md)."""
RS_DROPIN = UNITS / "glb-realserver.service.d" / "bpf-decap.conf"
"""What the tc-BPF decapsulator adds to the real server's unit (docs/realserver.md)."""


def parse(name: str | Path) -> dict[str, list[str]]:
    """Service-section settings of a unit (or a drop-in's path), every value of repeated keys kept."""
    out: dict[str, list[str]] = {}
    section = None
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}{key}", []).append(value)
    return out


@pytest.mark.parametrize("name", ["glb-dnsfront.service", "glb-director@.service", "glb-realserver.service"])
def test_unit_settings(name):
    u = parse(name)
    svc = "[Service]"
    assert u[f"{svc}NoNewPrivileges"] == ["yes"]
    assert u[f"{svc}ProtectSystem"] == ["strict"]
    assert "/etc/glb/" in " ".join(u.get(f"{svc}ExecStart", []) + u.get(f"{svc}EnvironmentFile", []))
    if name != "glb-realserver.service":
        assert u[f"{svc}ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert u[f"{svc}User"] == ["glb"]
        assert "--config /etc/glb/glb.yaml" in u[f"{svc}ExecStart"][0]
    caps = set(u[f"{svc}CapabilityBoundingSet"][0].split())
    if name == "glb-dnsfront.service":
        assert caps == {"CAP_NET_BIND_SERVICE"}
    else:
        assert caps == {"CAP_NET_RAW", "CAP_NET_ADMIN"}
    if name == "glb-director@.service":
        assert set(u[f"{svc}AmbientCapabilities"][0].split()) == {"CAP_NET_RAW", "CAP_NET_ADMIN"}
        assert "--site %i" in u[f"{svc}ExecStart"][0]
    if name == "glb-realserver.service":
        # Root uid, and /proc/sys/net must stay writable (no ProtectKernelTunables):
        # every other kernel tunable must be out of its reach.
        ro = set(" ".join(u[f"{svc}ReadOnlyPaths"]).replace("-/", "/").split())
        assert {"/sys", "/proc/sys/kernel", "/proc/sys/vm", "/proc/sys/fs", "/proc/sys/dev", "/proc/sysrq-trigger"} <= ro
        assert not any(p in ("/proc", "/proc/sys") or p.startswith("/proc/sys/net") for p in ro)
        assert "ProtectKernelTunables" not in " ".join(u)


def bounding_set(unit: str, dropin: Path | None = None) -> set[str]:
    """A unit's capability bounding set, with a drop-in's (systemd merges them)."""
    caps = set(parse(unit)["[Service]CapabilityBoundingSet"][0].split())
    if dropin is not None:
        caps |= set(parse(dropin)["[Service]CapabilityBoundingSet"][0].split())
    return caps


def director_capabilities(kernel_dataplane: bool) -> set[str]:
    """The director's bounding set: its unit's, with the kernel data plane's drop-in."""
    return bounding_set("glb-director@.service", DROPIN if kernel_dataplane else None)


def realserver_capabilities(bpf_decap: bool) -> set[str]:
    """The real server's bounding set (a root uid): its unit's, with the BPF decapsulator's drop-in."""
    return bounding_set("glb-realserver.service", RS_DROPIN if bpf_decap else None)


def test_the_bpf_decapsulator_s_drop_in():
    u = parse(RS_DROPIN)
    assert realserver_capabilities(True) == {"CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    assert u["[Service]SystemCallFilter"] == ["bpf"] and u["[Service]ReadWritePaths"] == ["-/sys/fs/bpf"]
    assert parse("glb-realserver.service")["[Service]SystemCallFilter"] == ["@system-service"]


def test_the_kernel_dataplane_drop_in():
    """What tests/director/dataplane/test_tcattach_netns.py proves the kernel data plane needs, and no more:
    bpf(2) past the unit's @system-service filter, the bpffs writable, root for its 0700 mount."""
    u = parse(DROPIN)
    svc = "[Service]"
    assert director_capabilities(True) == {"CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    assert set(u[f"{svc}AmbientCapabilities"][0].split()) == set(u[f"{svc}CapabilityBoundingSet"][0].split())
    assert u[f"{svc}SystemCallFilter"] == ["bpf"] and u[f"{svc}User"] == ["root"]
    assert u[f"{svc}ReadWritePaths"] == ["-/sys/fs/bpf"]
    base = parse("glb-director@.service")
    assert base[f"{svc}SystemCallFilter"] == ["@system-service"]  # which holds no bpf: hence the drop-in
    assert "NoNewPrivileges" not in " ".join(u)  # the unit's hardening stays


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A root for systemd-analyze: the units, a stand-in /opt/glb/bin/glb, the system's targets."""
    require(binary_unavailable("systemd-analyze", "systemd"),
            None if SYSTEM_UNITS.is_dir() else f"no {SYSTEM_UNITS} to resolve targets against (apt package systemd)")
    root = tmp_path_factory.mktemp("sdroot")
    (root / "opt/glb/bin").mkdir(parents=True)
    glb = root / "opt/glb/bin/glb"
    glb.write_text("#!/bin/sh\n")
    glb.chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy("/bin/kill", root / "bin/kill")
    lib = root / "usr/lib/systemd/system"
    lib.mkdir(parents=True)
    for unit in SYSTEM_UNITS.glob("*.target"):  # sysinit.target, network-online.target, ...
        if unit.is_file():
            shutil.copy(unit, lib / unit.name)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS.glob("*.service"):
        shutil.copy(unit, etc / unit.name)
    return root


INSTANCES = ["glb-dnsfront.service", "glb-director@dc1.service", "glb-realserver.service"]


def test_systemd_analyze_verify(fake_root):
    res = subprocess.run([ANALYZE, "verify", f"--root={fake_root}", *INSTANCES], capture_output=True, text=True)
    print(res.stdout + res.stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr


@pytest.mark.parametrize("dropin, unit", [(DROPIN, "glb-director@dc1.service"),
                                          (RS_DROPIN, "glb-realserver.service")], ids=["director", "realserver"])
def test_systemd_analyze_verify_with_the_bpf_drop_ins(fake_root, tmp_path, dropin, unit):
    root = tmp_path / "root"
    shutil.copytree(fake_root, root, symlinks=True)
    shutil.copytree(dropin.parent, root / "etc/systemd/system" / dropin.parent.name)
    res = subprocess.run([ANALYZE, "verify", f"--root={root}", unit], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stdout + res.stderr
    sec = subprocess.run([ANALYZE, "security", "--offline=yes", f"--root={root}", "--no-pager", unit],
                         capture_output=True, text=True)
    print(sec.stdout[-300:])  # higher than without it (CAP_SYS_ADMIN): docs/operations.md


@pytest.mark.parametrize("unit", INSTANCES)
def test_systemd_analyze_security(fake_root, unit):
    res = subprocess.run([ANALYZE, "security", "--offline=yes", f"--root={fake_root}", "--no-pager", unit],
                         capture_output=True, text=True)
    if res.returncode != 0 and "offline" in res.stderr:
        require(f"this systemd-analyze has no offline security check (systemd 250 or later has): {res.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    print(f"{unit}: exposure {m.group(1)}")
    assert float(m.group(1)) <= 3.0  # systemd calls up to 3.9 "OK"; keep well inside it
