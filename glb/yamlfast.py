"""Reading plain YAML fast: libyaml's events straight into dicts and lists.

PyYAML's loader composes a node per value and constructs it through generic
machinery (15-25 us a value): 10,000 load-balanced names took 10-30 s. Most
configs use a plain subset of YAML: one document, no anchors, aliases,
explicit tags or merge keys. ``load`` reads that subset from libyaml's event
stream, resolving each plain scalar with PyYAML's own implicit resolvers and
constructors (so ``yes``, ``0x1F``, ``1_000``, ``~`` mean what they mean to
PyYAML), and raises ``Unsupported`` for anything else, including every error
(a duplicate key, a syntax error): the caller then reads the text with the
full loader, which gives the same data, or its error message with a line
and column.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode

AVAILABLE = hasattr(yaml, "CSafeLoader")
"""PyYAML was built with libyaml (without it, this module would be no faster)."""

_STR = "tag:yaml.org,2002:str"
_RESOLVERS = yaml.resolver.Resolver.yaml_implicit_resolvers
_CONSTRUCTORS = yaml.constructor.SafeConstructor.yaml_constructors


class Unsupported(Exception):
    """Not the plain subset (or not valid): read it with the full loader."""


class _Mapping:
    __slots__ = ("data", "key", "has_key")

    def __init__(self) -> None:
        self.data: dict = {}
        self.key: Any = None
        self.has_key = False


def load(text: str) -> Any:
    """The data of a one-document plain-YAML ``text``; ``Unsupported`` otherwise."""
    if not AVAILABLE:
        raise Unsupported("no libyaml")
    constructor = yaml.constructor.SafeConstructor()
    cache: dict[str, Any] = {}

    def plain(value: str) -> Any:
        # PyYAML's Resolver.resolve for a plain scalar, then its constructor.
        got = cache.get(value, cache)
        if got is not cache:
            return got
        tag = _STR
        for candidate, regexp in _RESOLVERS.get(value[:1], ()):
            if regexp.match(value):
                tag = candidate
                break
        if tag == _STR:
            result: Any = value
        elif tag in _CONSTRUCTORS and tag not in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):
            result = _CONSTRUCTORS[tag](constructor, ScalarNode(tag, value))
        else:
            raise Unsupported(tag)
        if isinstance(result, Hashable):
            cache[value] = result
        return result

    stack: list[Any] = []
    root: Any = None
    documents = 0
    try:
        events = yaml.parse(text, Loader=yaml.CSafeLoader)
        for ev in events:
            cls = ev.__class__
            if cls is ScalarEvent:
                if ev.anchor is not None or ev.tag is not None:
                    raise Unsupported("anchor or tag")
                value: Any = plain(ev.value) if ev.implicit[0] else ev.value
            elif cls is MappingStartEvent or cls is SequenceStartEvent:
                if ev.anchor is not None or (ev.tag is not None and not ev.implicit):
                    raise Unsupported("anchor or tag")
                stack.append(_Mapping() if cls is MappingStartEvent else [])
                continue
            elif cls is MappingEndEvent or cls is SequenceEndEvent:
                top = stack.pop()
                value = top.data if cls is MappingEndEvent else top
            elif cls is DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise Unsupported("several documents")
                continue
            elif cls in (StreamStartEvent, StreamEndEvent, DocumentEndEvent):
                continue
            elif cls is AliasEvent:
                raise Unsupported("alias")
            else:
                raise Unsupported(cls.__name__)
            if not stack:
                root = value
                continue
            parent = stack[-1]
            if parent.__class__ is list:
                parent.append(value)
            elif not parent.has_key:
                if not isinstance(value, Hashable) or value in parent.data:
                    raise Unsupported("key")
                parent.key, parent.has_key = value, True
            else:
                parent.data[parent.key] = value
                parent.has_key = False
    except yaml.YAMLError as e:
        raise Unsupported(str(e)) from None
    return root
