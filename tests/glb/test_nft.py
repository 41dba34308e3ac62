"""glb.nft against stand-in nft executables: the exit status, the first line
of complaint, the timeout and a missing binary each become one NftError line."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from glb import nft
from glb.errors import GLBError, NftError


def fake_nft(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nft"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_load_passes_the_script_on_stdin(tmp_path):
    seen = tmp_path / "seen"
    binary = fake_nft(tmp_path, f'[ "$1 $2" = "-f -" ] || exit 9\ncat > {seen}\n')
    nft.load("table inet t {}\n", nft=binary)
    assert seen.read_text() == "table inet t {}\n"


def test_a_refused_script_reports_nfts_first_line_not_the_carets(tmp_path):
    binary = fake_nft(tmp_path, 'cat >/dev/null\nprintf "%s\\n" "/dev/stdin:1:1-5: Error: syntax error" "tabel inet t" "^^^^^" >&2\nexit 1\n')
    with pytest.raises(NftError) as info:
        nft.load("tabel inet t\n", nft=binary)
    assert str(info.value) == "/dev/stdin:1:1-5: Error: syntax error"
    assert isinstance(info.value, GLBError)


def test_silent_failure_reports_the_exit_status(tmp_path):
    binary = fake_nft(tmp_path, "exit 3\n")
    res = nft.run(["list", "table", "inet", "t"], nft=binary)
    assert res.returncode == 3 and nft.reason(res) == "exit status 3"


def test_a_hung_nft_is_abandoned_at_the_timeout(tmp_path):
    binary = fake_nft(tmp_path, "exec sleep 30\n")
    with pytest.raises(NftError, match=r"^nft list ruleset did not finish within 0\.2s$"):
        nft.run(["list", "ruleset"], timeout=0.2, nft=binary)


def test_a_missing_binary_is_one_line(tmp_path):
    with pytest.raises(NftError, match=r"^cannot run .*/absent: No such file or directory$"):
        nft.run(["list", "ruleset"], nft=str(tmp_path / "absent"))
