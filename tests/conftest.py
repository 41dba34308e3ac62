"""Shared fixtures. Keep this generic: fixtures specific to one module live in its test file."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.environment import require
from tests.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@needs(reason)`` marks (tests/environment.py): skip, or fail under CI=true, before any fixture runs."""
    for mark in item.iter_markers("needs"):
        require(*mark.args)
    netns.unmarked_test = None if item.get_closest_marker("netns") else item.nodeid


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.only_params(fixture=[param, ...])``: the test exists only for those params of a
    parametrized (module) fixture, e.g. only in a module's kernel lab. Its other variants are deselected,
    neither collected nor skipped, and the fixture keeps its params, so the module's lab and test order
    stay as they are (an indirect parametrization would make a lab of its own and reorder them)."""
    kept, dropped = [], []
    for item in items:
        mark = item.get_closest_marker("only_params")
        params = item.callspec.params if mark and hasattr(item, "callspec") else {}
        for name, allowed in (mark.kwargs.items() if mark else ()):
            if name not in params:
                raise pytest.UsageError(f"{item.nodeid}: only_params({name}=...) but {name} is not parametrized")
        wanted = not mark or all(params[name] in allowed for name, allowed in mark.kwargs.items())
        (kept if wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _redis_command(port: int, command: bytes, timeout: float = 0.5) -> bytes:
    """Send one inline command and return the first reply line (no redis library needed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(command + b"\r\n")
        return s.recv(64)


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 with no persistence, restartable on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None):
        self.port = port or free_port()
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--daemonize", "no", "--loglevel", "warning",
             "--logfile", str(self.workdir / "redis.log"),
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.workdir}/redis.log")
            try:
                if _redis_command(self.port, b"PING").startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout}s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()  # no persistence configured, nothing to flush
        proc.wait(timeout=10)

    def flushall(self) -> None:
        assert _redis_command(self.port, b"FLUSHALL").startswith(b"+OK")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of an empty Redis (restarted if an earlier test left it stopped)."""
    redis_server.start()
    redis_server.flushall()
    return redis_server.url
