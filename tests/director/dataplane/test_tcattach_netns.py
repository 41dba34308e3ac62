"""Attaching at tc ingress (director/dataplane/tcattach.py) on a real link in a namespace.

tcx where the kernel has it, a clsact filter where it does not (forced
here with ``tcx=False``); the next attachment replaces a program of the
same name, whichever way it was attached (a killed director's, an older
GLB's clsact filter), and detaching removes exactly what was attached.
Each step runs in the namespace (tcx resolves the ifindex there).
Needs root, namespaces and BPF (fails under CI=true when missing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.environment import bpf_unavailable, needs, tcx_unavailable
from tests.netns import Lab, lab_unavailable

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
