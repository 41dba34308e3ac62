"""Attaching at tc ingress (director/dataplane/tcattach.py) on a real link in a namespace.

tcx where the kernel has it, a clsact filter where it does not (forced
here with ``tcx=False``); the next attachment replaces a program of the
same name, whichever way it was attached (a killed director's, an older
GLB's clsact filter), and detaching removes exactly what was attached.
Each step runs in the namespace (tcx resolves the ifindex there). And what
deploy/systemd's units with their BPF drop-ins allow: the kernel data plane
and the real server's decapsulator run as root bounded to the units'
capabilities (setpriv), with them, and without one of them.
Needs root, namespaces and BPF (fails under CI=true when missing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.e2e.test_systemd_units import director_capabilities, realserver_capabilities
from tests.environment import bpf_unavailable, needs, tcx_unavailable
from tests.netns import Lab, lab_unavailable, private_bpffs

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.netns, needs(lab_unavailable()), needs(bpf_unavailable())]

STEPS = """
import json, socket, sys
from director.dataplane import tcattach
from director.dataplane.libbpf import LibBpf
from director.realserver import bpfdecap
out = []
for step in json.loads(sys.argv[1]):
    if step[0] == "attach":  # attach, tcx?: leaves the program attached when this process exits
        out.append(tcattach.TcIngress("eth0", LibBpf().prog_fd, tcx=step[1]).how)
    elif step[0] == "detach":  # detach, how
        tcattach.detach(socket.if_nametoindex("eth0"), step[1], "glb_ingress")
    elif step[0] == "decap_detach":  # a real server's teardown with a runtime record's "how"
        bpfdecap.detach("eth0", step[1])
    elif step[0] == "decap_attach":  # decap_attach, tcx?: as setup does, or as setup did before tcx
        loaded = bpfdecap.Loaded(())
        if step[1]:
            out.append(bpfdecap.attach("eth0", loaded.prog_fd))
        else:
            out.append(tcattach.attach("eth0", loaded.prog_fd, bpfdecap.PROGRAM, tcattach.DECAP_PRIO, tcx=False)[1])
        loaded.close()
    out.append(tcattach.attached("eth0"))
print(json.dumps(out))
"""


def steps(ns, *todo) -> list:
    return json.loads(ns.run([sys.executable, "-c", STEPS, json.dumps(todo)], cwd=ROOT).stdout)


def names(found: list[dict]) -> list[tuple[str, str]]:
    return [(p["how"], p["name"]) for p in found]


@pytest.fixture
def ns():
    with Lab("tcattach") as lab:
        sw = lab.netns("sw")
        host = lab.netns("host")
        lab.port(sw, lab.bridge(sw), host, "10.0.0.2/24")
        yield host


@needs(tcx_unavailable())
def test_tcx_replaces_its_own_and_an_older_clsact_filter_and_detaches_cleanly(ns):
    how, found = steps(ns, ["attach", False])
    assert how == "clsact-made" and names(found) == [("clsact", "glb_ingress")]
    how, found = steps(ns, ["attach", True])
    # tcx runs before the clsact filters: an older GLB's filter there is removed, not left behind it.
    assert how == "tcx" and names(found) == [("tcx", "glb_ingress")]
    assert "glb_ingress" not in ns.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    first = found[0]["id"]
    _, found = steps(ns, ["attach", True])  # a restarted director: in the old one's place, not beside it
    assert names(found) == [("tcx", "glb_ingress")] and found[0]["id"] != first
    (found,) = steps(ns, ["detach", "tcx"])
    assert found == []
    (found,) = steps(ns, ["detach", "tcx"])  # gone already is fine
    assert found == []


def test_the_clsact_fallback_removes_the_qdisc_only_if_it_made_it(ns):
    how, _ = steps(ns, ["attach", False])
    assert how == "clsact-made"
    (found,) = steps(ns, ["detach", "clsact-made"])
    assert found == [] and "clsact" not in ns.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    ns.run(["tc", "qdisc", "add", "dev", "eth0", "clsact"])  # another tool's
    how, _ = steps(ns, ["attach", False])
    assert how == "clsact"
    (found,) = steps(ns, ["detach", "clsact"])
    assert found == [] and "clsact" in ns.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout


@needs(tcx_unavailable())
def test_the_real_servers_decapsulator_and_an_old_runtime_record(ns):
    how, found = steps(ns, ["decap_attach", True])
    assert how == "tcx" and names(found) == [("tcx", "glb_decap")]
    (found,) = steps(ns, ["decap_detach", "tcx"])
    assert found == []
    # A state file written before tcx says True/False (clsact qdisc made / found): teardown still works.
    how, found = steps(ns, ["decap_attach", False])
    assert how == "clsact-made" and names(found) == [("clsact", "glb_decap")]
    (found,) = steps(ns, ["decap_detach", True])
    assert found == [] and "clsact" not in ns.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout


@needs(tcx_unavailable())
def test_by_hand_list_and_detach_and_one_line_for_a_missing_interface(ns):
    """What docs/operations.md tells an operator to run after a director was killed outright."""
    tool = [sys.executable, "-m", "director.dataplane.tcattach"]
    steps(ns, ["attach", True])
    assert names(json.loads(ns.run([*tool, "eth0"], cwd=ROOT).stdout)) == [("tcx", "glb_ingress")]
    assert json.loads(ns.run([*tool, "eth0", "--detach", "glb_ingress"], cwd=ROOT).stdout) == []
    steps(ns, ["attach", False])
    assert json.loads(ns.run([*tool, "eth0", "--detach", "glb_ingress"], cwd=ROOT).stdout) == []
    assert "glb_ingress" not in ns.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    res = ns.run([*tool, "nope0"], cwd=ROOT, check=False)
    assert res.returncode == 1 and res.stderr.strip() == "tcattach: no interface nope0"


STARTS = """
import json, sys
from pathlib import Path
from director.dataplane import tcattach
from director.dataplane.kernel import KernelDataplane
from glb.errors import KernelDataplaneError
out = []
for _ in range(2):  # a start, then a restart over what it left (attached, pinned): never closed, as when killed
    try:
        kd = KernelDataplane("eth0", 4096, [60.0] * 12, pin_dir=Path(sys.argv[1]))
        out.append([kd.tc.how, kd.pins.state])
    except KernelDataplaneError as e:
        out.append(str(e))
print(json.dumps(out))
"""


@pytest.fixture
def bpffs(tmp_path):
    with private_bpffs(tmp_path / "bpf") as root:
        yield root


def bounded(caps: set[str], argv: list[str]) -> list[str]:
    """``argv`` as root with only ``caps``, as a systemd unit's CapabilityBoundingSet leaves a root uid."""
    return ["setpriv", "--bounding-set", "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in sorted(caps)),
            *argv]


def starts_with(ns, caps: set[str], pins: Path) -> list:
    """Two starts of the kernel data plane as root bounded to ``caps``, as the systemd unit runs it."""
    res = ns.run(bounded(caps, [sys.executable, "-c", STARTS, str(pins / "glb")]), cwd=ROOT)
    listed = ns.run([sys.executable, "-m", "director.dataplane.tcattach", "eth0"], cwd=ROOT)  # all of root's
    return [*json.loads(res.stdout), [p["name"] for p in json.loads(listed.stdout)]]


@needs(tcx_unavailable())
def test_the_systemd_drop_in_s_capabilities_load_pin_and_replace(ns, bpffs):
    """deploy/systemd's director unit with its kernel data plane drop-in: the capabilities are enough to
    load, pin, attach, and on a restart replace the program and reuse the pins."""
    assert starts_with(ns, director_capabilities(True), bpffs) == [["tcx", "new"], ["tcx", "reused"],
                                                                   ["glb_ingress"]]


@needs(tcx_unavailable())
def test_a_restart_without_cap_sys_admin_refuses_rather_than_stack_a_second_program(ns, bpffs):
    """Telling its program from another's at tcx ingress takes a program's name, which only CAP_SYS_ADMIN
    reads: without it a restart would attach a second program behind the first, which would go on taking
    every packet. One line instead (auto then runs the userspace engine)."""
    caps = director_capabilities(True) - {"CAP_SYS_ADMIN"}
    first, second, attached = starts_with(ns, caps, bpffs)
    assert first == ["tcx", "new"]
    assert second == ("cannot attach glb_ingress to eth0 (tcx): cannot read the programs there: "
                      "Operation not permitted (needs CAP_SYS_ADMIN)")
    assert attached == ["glb_ingress"]
    # Listing by hand without it says so, rather than "nothing attached".
    res = ns.run(bounded(caps, [sys.executable, "-m", "director.dataplane.tcattach", "eth0"]), cwd=ROOT, check=False)
    assert res.returncode == 1 and res.stderr.strip() == ("tcattach: cannot list tcx ingress of eth0: cannot read "
                                                          "the programs there: Operation not permitted (needs "
                                                          "CAP_SYS_ADMIN)")
    # And the unit without the drop-in cannot load it at all.
    res = ns.run(bounded(director_capabilities(False), [sys.executable, "-c", STARTS, str(bpffs / "other")]),
                 cwd=ROOT)
    assert json.loads(res.stdout)[0].startswith("the kernel refused the tc program: Operation not permitted")



@needs(tcx_unavailable())
def test_the_real_server_unit_s_capabilities_with_and_without_the_bpf_decap_drop_in(ns, tmp_path):
    """glb-realserver.service is a root uid bounded to its capabilities: with its bpf-decap drop-in's the
    BPF decapsulator sets up and tears down; without them ``--decap bpf`` fails in one line; without
    CAP_SYS_ADMIN alone teardown says it could not remove the program (and keeps it in the state file)."""
    glb = str(Path(sys.executable).parent / "glb")
    state = str(tmp_path / "rs.json")
    setup = [glb, "realserver", "setup", "--vip", "10.0.0.100", "--mode", "tun", "--decap", "bpf", "--state-file", state]
    teardown = [glb, "realserver", "teardown", "--state-file", state]
    listed = [sys.executable, "-m", "director.dataplane.tcattach", "eth0"]

    def programs() -> list[str]:
        return [p["name"] for p in json.loads(ns.run(listed, cwd=ROOT).stdout)]

    ns.run(bounded(realserver_capabilities(True), setup), cwd=ROOT)
    assert programs() == ["glb_decap"]
    ns.run(bounded(realserver_capabilities(True), teardown), cwd=ROOT)
    assert programs() == []

    res = ns.run(bounded(realserver_capabilities(False), setup), cwd=ROOT, check=False)
    assert res.returncode != 0 and programs() == []
    assert res.stderr.strip().splitlines()[-1].startswith(
        "glb: error: cannot load the BPF decapsulator: the kernel refused the tc program: Operation not permitted")

    ns.run(bounded(realserver_capabilities(True) - {"CAP_SYS_ADMIN"}, setup), cwd=ROOT)
    res = ns.run(bounded(realserver_capabilities(True) - {"CAP_SYS_ADMIN"}, teardown), cwd=ROOT, check=False)
    assert res.returncode != 0 and "(needs CAP_SYS_ADMIN)" in res.stderr and programs() == ["glb_decap"]
    ns.run(teardown, cwd=ROOT)  # with every capability: what it left
    assert programs() == []
