"""The fast YAML reader gives exactly what the full loader gives, or steps aside."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from glb import config, yamlfast

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not yamlfast.AVAILABLE, reason="PyYAML without libyaml")

PLAIN = [
    "a: 1\nb: [x, 'y', \"z\"]\nc: {d: e}\n",
    "on: yes\noff: No\nt: true\nn: ~\ne:\nq: ''\n",
    "hex: 0x1F\noct: 0o17\nsep: 1_000\nneg: -3\nf: 1.5\nexp: 1.0e+3\nnotexp: 1e3\ninf: .inf\nsix: 1:30\n",
    "when: 2026-12-03\nstamp: 2026-12-03T10:00:00Z\nip: 192.0.2.1\nv6: '2001:db8::1'\n",
    "- 1\n- - 2\n  - {a: [b, {c: d}]}\n- ''\n",
    "multi: |\n  line 1\n  line 2\nfolded: >\n  a\n  b\n",
    "'<<': quoted merge is a plain key\n1: int key\n",
    "",
    "# only a comment\n",
]
NOT_PLAIN = [
    "a: &x 1\nb: *x\n",  # anchors, aliases
    "base: &b {x: 1}\nc:\n  <<: *b\n",  # merge key
    "a: !!str 5\n",  # explicit tag
    "a: 1\na: 2\n",  # duplicate key: the full loader's message
    "? [a, b]\n: 1\n",  # unhashable key
    "a: [1, 2\n",  # syntax error
    "a: 1\n---\nb: 2\n",  # two documents
]


@pytest.mark.parametrize("text", PLAIN)
def test_plain_yaml_reads_as_the_full_loader_reads_it(text):
    want = yaml.load(text, Loader=config._StrictLoader)  # noqa: S506
    assert yamlfast.load(text) == want


def test_nan_reads_as_nan():
    assert math.isnan(yamlfast.load("x: .nan\n")["x"])


@pytest.mark.parametrize("text", NOT_PLAIN)
def test_anything_else_is_left_to_the_full_loader(text):
    with pytest.raises(yamlfast.Unsupported):
        yamlfast.load(text)


@pytest.mark.parametrize("path", sorted((ROOT / "deploy" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_example_configs_read_the_same(path):
    text = path.read_text()
    assert yamlfast.load(text) == yaml.load(text, Loader=config._StrictLoader)  # noqa: S506


def test_config_errors_keep_the_full_loaders_line_and_column():
    with pytest.raises(config.ConfigError) as info:
        config.loads("zones: []\nzones: []\n", source="glb.yaml")
    assert info.value.problems[0].startswith("glb.yaml:2:1: YAML syntax error: duplicate key 'zones'")
