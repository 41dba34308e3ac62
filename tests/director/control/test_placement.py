"""Where the control plane and the packet workers run (director.control.placement)."""

from __future__ import annotations

import pytest

from glb.errors import DirectorError
from director.control.placement import place


@pytest.mark.parametrize(
    "available, setting, packet_path, control, packet",
    [
        ({0, 1, 2, 3}, None, True, (3,), (0, 1, 2)),    # auto: last CPU for probes, the rest for packets
        ({0, 1}, None, True, (1,), (0,)),
        ({0}, None, True, (), ()),                       # one CPU: nothing to separate
        ({0, 1, 2, 3}, None, False, (), ()),             # no packet path (lo): no pinning
        ({0, 1, 2, 3}, (), True, (), ()),                # all: share everything
        ({0, 1, 2, 3}, (0,), True, (0,), (1, 2, 3)),     # explicit
        ({0, 1, 2, 3}, (0, 1, 2, 3), True, (0, 1, 2, 3), ()),  # nothing left: packet workers share
        ({0, 1, 2, 3}, (2,), False, (2,), ()),
    ],
)
def test_place(available, setting, packet_path, control, packet):
    p = place(frozenset(available), setting, packet_path)
    assert (p.control, p.packet) == (control, packet)
    assert p.why


def test_place_refuses_cpus_this_process_cannot_use():
    with pytest.raises(DirectorError, match=r"probe_cpus: CPU 5 not available to this process \(it may run on 0,1\)"):
        place(frozenset({0, 1}), (1, 5), True)
