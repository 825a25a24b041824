"""Routing: which block serves a request's path, and with which parameters.

A block's path is a pattern of segments: ``/chat`` (static), ``/rooms/:room``
(``:name`` matches one segment), ``/files/*`` (a last ``*`` matches the rest,
zero or more segments). The request's path is split on ``/`` as sent, and
each segment is percent-decoded once, so an encoded ``%2F`` stays inside its
segment and never moves a boundary. A parameter never matches an empty
segment, ``.`` or ``..``, nor a segment that holds one between ``/`` once
decoded (``%2E%2E%2Fx`` is ``../x``); nor does the rest of a ``*`` (except a
trailing ``/``: ``/files/`` matches ``/files/*`` with an empty rest, and
``/files/docs/`` with ``docs/``, a folder), so that a value can be joined
to a file path without climbing out of it.

Precedence, when several patterns match:

1. an exact path (no parameter) wins;
2. then the pattern with the longest static prefix (leading static segments);
3. then the block given first.

Routing runs in the accept thread for every handshake: an exact path is one
dictionary lookup; patterns are tried in precedence order.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Dict, Generic, List, Mapping, Optional, Sequence, Tuple, TypeVar
from urllib.parse import quote, unquote

__all__ = ["Pattern", "Router", "split_path", "fill"]

T = TypeVar("T")

_NO_PARAMS: Mapping[str, str] = MappingProxyType({})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_UNSAFE = frozenset(("", ".", ".."))


def _unsafe(segment: str) -> bool:
    """Does a decoded segment climb (``..``), stay (``.``) or start over
    (empty), alone or between the ``/`` an encoded ``%2F`` put in it?"""
    return segment in _UNSAFE or ("/" in segment
                                  and any(part in _UNSAFE for part in segment.split("/")))


def split_path(raw_path: str) -> List[str]:
    """The segments of a path as sent (``/a/b%2Fc`` gives ``["a", "b/c"]``),
    each percent-decoded once."""
    return [unquote(part) for part in raw_path.split("/")[1:]]


class Pattern:
    """A block's path, compiled."""

    __slots__ = ("path", "segments", "static_prefix", "rest", "names")

    def __init__(self, path: str) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"path must start with '/', not {path!r}")
        if "?" in path or "#" in path:
            raise ValueError(f"path must hold no query ('?') or fragment ('#'): {path!r}")
        self.path = path
        parts = path.split("/")[1:]
        self.segments: List[Tuple[bool, str]] = []  # (is a parameter, name or text)
        self.rest = False
        names: List[str] = []
        for i, part in enumerate(parts):
            if part == "*":
                if i != len(parts) - 1:
                    raise ValueError(f"'*' may only be the last segment of a path: {path!r}")
                self.rest = True
                names.append("*")
            elif part.startswith(":"):
                name = part[1:]
                if not _NAME.match(name):
                    raise ValueError(f"':{name}' in {path!r}: a parameter is ':' and a name "
                                     "(letters, digits, '_')")
                if name in names:
                    raise ValueError(f"parameter ':{name}' appears twice in {path!r}")
                names.append(name)
                self.segments.append((True, name))
            else:
                self.segments.append((False, unquote(part)))
        self.names = tuple(names)
        prefix = 0
        for is_param, _ in self.segments:
            if is_param:
                break
            prefix += 1
        self.static_prefix = prefix

    @property
    def is_exact(self) -> bool:
        """A path without parameters."""
        return not self.names

    def match(self, segments: Sequence[str]) -> Optional[Dict[str, str]]:
        """The parameters if ``segments`` match, else None."""
        mine = self.segments
        if len(segments) < len(mine) or (len(segments) > len(mine) and not self.rest):
            return None
        params: Dict[str, str] = {}
        for (is_param, text), segment in zip(mine, segments):
            if is_param:
                if _unsafe(segment):
                    return None
                params[text] = segment
            elif segment != text:
                return None
        if self.rest:
            rest = segments[len(mine):]
            # A trailing "/" (an empty last segment) names a folder: allowed.
            named = rest[:-1] if rest and rest[-1] == "" else rest
            if any(_unsafe(s) for s in named):
                return None
            params["*"] = "/".join(rest)
        return params


class Router(Generic[T]):
    """Finds the target (a block's server) of a path."""

    def __init__(self, routes: Sequence[Tuple[str, T]]) -> None:
        self._exact: Dict[Tuple[str, ...], T] = {}
        patterns: List[Tuple[int, int, Pattern, T]] = []
        seen = set()
        for index, (path, target) in enumerate(routes):
            pattern = Pattern(path)
            if path in seen:
                raise ValueError(f"two blocks share the path {path!r}")
            seen.add(path)
            if pattern.is_exact:
                # Two paths may decode to the same segments (/%61, /a): the
                # first given wins, as between patterns.
                self._exact.setdefault(tuple(text for _, text in pattern.segments), target)
            else:
                patterns.append((-pattern.static_prefix, index, pattern, target))
        patterns.sort(key=lambda item: (item[0], item[1]))
        self._patterns = [(pattern, target) for _, _, pattern, target in patterns]
        # The exact paths as a request without '%' spells them: such a path
        # splits into these very segments, so one dict lookup on the string
        # finds it (the accept thread does this for every handshake).
        self._plain: Dict[str, T] = {
            "/" + "/".join(segments): target for segments, target in self._exact.items()
            if not any("%" in s or "/" in s for s in segments)}

    def match(self, raw_path: str) -> Optional[Tuple[T, Mapping[str, str]]]:
        """(target, parameters) for a path as sent, or None."""
        if "%" not in raw_path:
            target = self._plain.get(raw_path)
            if target is not None:
                return target, _NO_PARAMS
        segments = split_path(raw_path)
        target = self._exact.get(tuple(segments))
        if target is not None:
            return target, _NO_PARAMS
        for pattern, target in self._patterns:
            params = pattern.match(segments)
            if params is not None:
                return target, params
        return None


def fill(template: str, params: Mapping[str, str]) -> str:
    """``template`` (``/r/:room``, ``/new/*``) with ``params`` put in, each
    value percent-encoded as a path segment (the rest of a ``*`` keeps its
    slashes)."""
    out = []
    for part in template.split("/"):
        if part.startswith(":") and part[1:] in params:
            out.append(quote(params[part[1:]], safe=""))
        elif part == "*" and "*" in params:
            out.append(quote(params["*"], safe="/"))
        else:
            out.append(part)
    return "/".join(out)
