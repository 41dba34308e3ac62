"""glb.http.serve on loopback: the bound port, and a clash as one line in the caller's error class."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from glb.config import ListenAddress
from glb.errors import DNSFrontError
from glb.http import serve


def app() -> web.Application:
    a = web.Application()

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello")

    a.router.add_get("/", hello)
    return a


async def test_serves_on_the_port_it_reports_and_stops():
    served = await serve(app(), ListenAddress("127.0.0.1", 0), what="a test")
    try:
        assert served.port > 0
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{served.port}/") as r:
            assert await r.text() == "hello"
    finally:
        await served.close()
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{served.port}/"):
            pass


async def test_a_port_in_use_is_one_line_in_the_callers_error_class():
    first = await serve(app(), ListenAddress("127.0.0.1", 0), what="a test")
    try:
        with pytest.raises(DNSFrontError) as info:
            await serve(app(), ListenAddress("127.0.0.1", first.port), what="the status server", error=DNSFrontError)
        assert str(info.value) == f"cannot listen on 127.0.0.1:{first.port} for the status server: address already in use"
    finally:
        await first.close()
