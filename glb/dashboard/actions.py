"""The page's actions (drain, undrain, weight; a server or a whole site), through the admin API.

The dashboard never writes Redis: like ``glb drain``, it asks the site's
director, which checks the request against what it runs and records the
override with who, when and why. The token is the one the operator typed into
the page; it is passed through to the director, which is the one judge of it
(a wrong token comes back as the director's 401, said in one line).

``call_director`` is the one place that reaches the admin API, so moving that
API (its own listener, scoped tokens) changes one function.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from glb.admin import DirectorClient, client_tls, connect_address, find_site, parse_server, resolve_port
from glb.config import Config
from glb.errors import AdminError
from glb.state import MAX_WEIGHT

MAX_TEXT = 200
"""Longest accepted reason or operator name."""


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """One validated action from the page."""

    action: str
    site: str
    who: str
    why: str
    service: str | None = None
    address: str | None = None
    port: int = 0
    weight: int | None = None

    @property
    def target(self) -> str:
        if self.service is None:
            return f"site {self.site}"
        from glb.dashboard.model import server_key

        return f"server {server_key(self.site, self.service, self.address or '', self.port)}"


@dataclass(frozen=True, slots=True)
class Action:
    server: bool
    """Names a real server (else the whole site)."""
    verb: str
    """How the timeline says it."""
    call: Callable[[DirectorClient, ActionRequest], dict[str, Any]]


ACTIONS: Mapping[str, Action] = {
    "drain": Action(True, "drained", lambda c, r: c.drain(r.service, r.address, r.port, who=r.who, why=r.why)),
    "undrain": Action(True, "undrained", lambda c, r: c.undrain(r.service, r.address, r.port, who=r.who, why=r.why)),
    "weight": Action(True, "set the weight of",
                     lambda c, r: c.set_weight(r.service, r.address, r.port, r.weight, who=r.who, why=r.why)),
    "drain_site": Action(False, "drained", lambda c, r: c.drain_site(who=r.who, why=r.why)),
    "undrain_site": Action(False, "undrained", lambda c, r: c.undrain_site(who=r.who, why=r.why)),
}


def _text(body: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise AdminError(f"{key}: expected text")
    value = " ".join(value.split())  # one line: it goes into logs and the timeline
    if required and not value:
        raise AdminError(f"{key}: required")
    if len(value) > MAX_TEXT:
        raise AdminError(f"{key}: at most {MAX_TEXT} characters")
    return value


def parse_action(cfg: Config, body: Any) -> ActionRequest:
    """Validate the page's JSON body; AdminError with a one-line reason otherwise."""
    if not isinstance(body, dict):
        raise AdminError("expected a JSON object")
    name = body.get("action")
    action = ACTIONS.get(name) if isinstance(name, str) else None
    if action is None:
        raise AdminError(f"action: expected one of {', '.join(ACTIONS)}")
    site_name = _text(body, "site", required=True)
    site = find_site(cfg, site_name)
    who, why = _text(body, "who", required=True), _text(body, "why", required=True)
    if not action.server:
        return ActionRequest(name, site.name, who, why)
    service = _text(body, "service", required=True)
    svc = site.service(service)
    if svc is None:
        raise AdminError(f"site {site.name} has no service {service!r}")
    try:
        address, port = parse_server(_text(body, "server", required=True))
    except ValueError as e:
        raise AdminError(f"server: {e}") from None
    weight = None
    if name == "weight":
        weight = body.get("weight")
        if weight is not None and (not isinstance(weight, int) or isinstance(weight, bool)
                                   or not 0 <= weight <= MAX_WEIGHT):
            raise AdminError(f"weight: expected 0..{MAX_WEIGHT}, or null to clear the override")
    return ActionRequest(name, site.name, who, why, service, address, resolve_port(svc, address, port), weight)


def describe(req: ActionRequest) -> str:
    """The timeline's line for an action."""
    action = ACTIONS[req.action]
    if req.action == "weight":
        return f"{req.target}: weight override " + ("cleared" if req.weight is None else f"set to {req.weight}")
    return f"{action.verb} {req.target}"


def call_director(cfg: Config, site: str, token: str, call: Callable[[DirectorClient], dict[str, Any]],
                  at: tuple[str, int] | None = None) -> dict[str, Any]:
    """Run ``call`` against the admin API of ``site``'s director with the operator's token.

    The admin API has its own listener (``director.admin_listen``, TLS when
    ``admin.tls_cert`` is set). ``at`` is where the director is reached when
    it binds a wildcard on another host (``glb dashboard --director``): its
    host with the admin listener's port. Blocking (``DirectorClient`` is
    synchronous); ``perform`` runs it in a thread."""
    director = find_site(cfg, site).director
    if director.admin_listen is None:
        raise AdminError(f"{cfg.source}: site {site} has no director.admin_listen, so its admin API is off")
    host, port = connect_address(director.admin_listen)
    if at is not None:
        host = at[0]
    # No config_source: the token is the page's, not the config's, and the
    # director's refusal must say so.
    client = DirectorClient(site, host, port, token=token, tls=client_tls(cfg.admin),
                            token_source="the token given in the page")
    client.check_site()
    return call(client)


async def perform(cfg: Config, req: ActionRequest, token: str,
                  at: tuple[str, int] | None = None) -> dict[str, Any]:
    """Do ``req``; AdminError (one line from the director's answer) if refused."""
    action = ACTIONS[req.action]
    return await asyncio.to_thread(call_director, cfg, req.site, token, lambda c: action.call(c, req), at)
