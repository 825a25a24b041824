"""Routing: path parameters and precedence (``gaman_sync.server.routing``).

The router is checked against a reference written here from the documented
rule alone, on hypothesis-generated sets of patterns and paths:

- a path is split on ``/`` as sent, each segment percent-decoded once;
- ``:name`` matches one segment, a last ``*`` the rest (zero or more
  segments; ``params["*"]`` is the rest joined with ``/``);
- a parameter never matches ``''``, ``.`` or ``..``, nor a value that holds
  one of them between ``/`` once decoded (``%2E%2E%2Fx``), and the rest of a
  ``*`` never holds one either, but for a trailing ``/`` (``/files/`` is the
  empty rest, ``/files/docs/`` the rest ``docs/``, a folder): a value can be
  joined to a directory without climbing out of it;
- precedence: an exact path (no parameter) wins, then the longest static
  prefix, then the block given first.

Then, on real sockets on 127.0.0.1, that ``ctx.request.params`` and
``ctx.request.query`` reach the handler (the last value of a repeated query
key wins).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaman_sync import InvalidStatus, connect, define_block
from gaman_sync.server.routing import Pattern, Router, fill

from .conftest import WAIT, Recorder

UNSAFE = ("", ".", "..")


# -- The reference: the documented rule, written as plainly as possible ------

def _unsafe_value(value: str) -> bool:
    return any(part in UNSAFE for part in value.split("/"))


def reference(patterns: List[str], raw_path: str) -> Optional[Tuple[int, Dict[str, str]]]:
    """(index of the pattern that serves ``raw_path``, its parameters), or None."""
    segments = [unquote(part) for part in raw_path.split("/")[1:]]
    found = []
    for index, pattern in enumerate(patterns):
        parts = pattern.split("/")[1:]
        rest = parts[-1] == "*"
        fixed = parts[:-1] if rest else parts
        if len(segments) < len(fixed) or (not rest and len(segments) != len(fixed)):
            continue
        params: Dict[str, str] = {}
        ok = True
        for part, segment in zip(fixed, segments):
            if part.startswith(":"):
                if _unsafe_value(segment):
                    ok = False
                params[part[1:]] = segment
            elif unquote(part) != segment:
                ok = False
        if rest:
            tail = segments[len(fixed):]
            named = tail[:-1] if tail and tail[-1] == "" else tail  # a trailing "/"
            if any(_unsafe_value(s) for s in named):
                ok = False
            params["*"] = "/".join(tail)
        if not ok:
            continue
        exact = not rest and not any(p.startswith(":") for p in fixed)
        prefix = 0
        for part in fixed:
            if part.startswith(":"):
                break
            prefix += 1
        found.append(((0 if exact else 1, -prefix, index), index, params))
    if not found:
        return None
    _, index, params = min(found, key=lambda item: item[0])
    return index, params


# -- Hypothesis: patterns and paths over a small alphabet, so that they meet --

# Static segments of patterns: plain, and percent-encoded ones that decode to
# the same text ("%61" is "a"), or to a "/" inside one segment.
STATIC = st.sampled_from(["a", "b", "ab", "%61", "a%2Fb", "x y"])
PARAM_NAMES = ["p", "q", "r", "s"]

# Segments of request paths: every static segment, its decoded or doubly
# encoded forms, and what must never match a parameter or a rest.
SEGMENT = st.sampled_from([
    "a", "b", "ab", "%61", "%2561", "a%2Fb", "a/b", "x%20y", "x y", "c",
    "", ".", "..", "%2E", "%2E%2E", "%2e%2e%2Fa", "a%2F", "%2Fa", "..%2Fetc", "%252E%252E",
    "%C3%A9", "%FF",
])


@st.composite
def a_pattern(draw) -> str:
    size = draw(st.integers(0, 4))
    parts = []
    names = list(PARAM_NAMES)
    for _ in range(size):
        if names and draw(st.booleans()):
            parts.append(":" + names.pop(draw(st.integers(0, len(names) - 1))))
        else:
            parts.append(draw(STATIC))
    if draw(st.integers(0, 3)) == 0:
        parts.append("*")
    return "/" + "/".join(parts)


PATTERNS = st.lists(a_pattern(), min_size=1, max_size=6, unique=True)
ANY_PATH = st.lists(SEGMENT, min_size=0, max_size=5).map(lambda s: "/" + "/".join(s))


@st.composite
def patterns_and_paths(draw) -> Tuple[List[str], List[str]]:
    """Patterns, and paths of which some are made from one of them (each
    parameter and rest filled with any segment), so that most paths meet
    several patterns."""
    patterns = draw(PATTERNS)
    paths = []
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.booleans()):
            paths.append(draw(ANY_PATH))
            continue
        parts = []
        for part in draw(st.sampled_from(patterns)).split("/")[1:]:
            if part == "*":
                parts.extend(draw(st.lists(SEGMENT, max_size=3)))
            elif part.startswith(":"):
                parts.append(draw(SEGMENT))
            else:
                parts.append(draw(st.sampled_from([part, unquote(part)])))
        paths.append("/" + "/".join(parts))
    return patterns, paths


@settings(max_examples=int(os.environ.get("ROUTING_EXAMPLES", "600")))
@given(case=patterns_and_paths())
def test_router_agrees_with_the_documented_rule(case):
    patterns, paths = case
    router = Router([(p, i) for i, p in enumerate(patterns)])
    for path in paths:
        want = reference(patterns, path)
        got = router.match(path)
        got = None if got is None else (got[0], dict(got[1]))
        assert got == want, (patterns, path, got, want)


@settings(max_examples=200)
@given(pattern=a_pattern(), segments=st.lists(SEGMENT, max_size=5))
def test_a_parameter_value_never_climbs_out_of_a_directory(pattern, segments):
    """Whatever matched, no value joined to a directory leaves it."""
    params = Pattern(pattern).match([unquote(s) for s in segments])
    for name, value in (params or {}).items():
        joined = os.path.normpath(os.path.join("/srv/files", value))
        assert joined == "/srv/files" or joined.startswith("/srv/files/"), (name, value)
        if name != "*":
            assert value not in UNSAFE


def test_precedence_by_hand():
    router = Router([("/files/*", "rest"), ("/rooms/:room", "room"),
                     ("/rooms/:room/:part", "part"), ("/rooms/lobby", "lobby"),
                     ("/:a/feed", "feed"), ("/users/:id/feed", "user feed")])
    assert router.match("/rooms/lobby") == ("lobby", {})              # exact wins
    assert router.match("/rooms/hall") == ("room", {"room": "hall"})
    assert router.match("/rooms/a/b") == ("part", {"room": "a", "part": "b"})
    assert router.match("/users/7/feed") == ("user feed", {"id": "7"})  # longer prefix
    assert router.match("/people/feed") == ("feed", {"a": "people"})
    assert router.match("/files/a/b.txt") == ("rest", {"*": "a/b.txt"})
    assert router.match("/files/") == ("rest", {"*": ""})
    assert router.match("/files") == ("rest", {"*": ""})
    assert router.match("/files/../etc") is None
    assert router.match("/files//etc") is None
    assert router.match("/files/a/") == ("rest", {"*": "a/"})  # a folder
    assert router.match("/files/a//") is None
    assert router.match("/files/../") is None
    assert router.match("/rooms/..") is None
    assert router.match("/rooms/%2E%2E") is None
    assert router.match("/rooms/") is None
    assert router.match("/rooms/a%2Fb") == ("room", {"room": "a/b"})  # %2F stays inside
    assert router.match("/rooms/%2561") == ("room", {"room": "%61"})  # decoded once
    assert router.match("/nowhere") is None


def test_order_given_breaks_ties_between_equal_patterns():
    router = Router([("/rooms/:a", "first"), ("/rooms/:b", "second")])
    assert router.match("/rooms/x") == ("first", {"a": "x"})
    # Two exact paths that decode to the same segments: the first given wins.
    router = Router([("/%61", "first"), ("/a", "second")])
    assert router.match("/a") == ("first", {})


def test_fill_puts_parameters_back_encoded():
    assert fill("/r/:room", {"room": "a/b c"}) == "/r/a%2Fb%20c"
    assert fill("/new/*", {"*": "x/y z"}) == "/new/x/y%20z"
    assert fill("/static", {"room": "x"}) == "/static"


@pytest.mark.parametrize("path, why", [
    ("rooms", "start with '/'"), ("/a/*/b", "last segment"), ("/a/:1x", "parameter"),
    ("/a/:x/:x", "twice"), ("/a?b", "query"),
])
def test_bad_patterns_are_refused(path, why):
    with pytest.raises(ValueError, match=why):
        Pattern(path)
    with pytest.raises(ValueError, match=why):
        define_block(path, lambda ctx: {})


# -- On real sockets ----------------------------------------------------------

def _recording_block(path: str, seen: Recorder):
    def handler(ctx):
        seen.add("request", ctx.request.path, dict(ctx.request.params), dict(ctx.request.query))
        return {"on_message": ctx.send}

    return define_block(path, handler)


def test_params_and_query_reach_the_handler(make_server):
    seen = Recorder()
    server = make_server([_recording_block("/rooms/:room", seen),
                          _recording_block("/users/:id/feed", seen),
                          _recording_block("/files/*", seen),
                          _recording_block("/rooms/lobby", seen)])
    base = f"ws://127.0.0.1:{server.port}"
    cases = [
        ("/rooms/kitchen?x=1", "/rooms/kitchen", {"room": "kitchen"}, {"x": "1"}),
        ("/rooms/caf%C3%A9", "/rooms/café", {"room": "café"}, {}),
        ("/rooms/a%2Fb", "/rooms/a/b", {"room": "a/b"}, {}),
        ("/users/42/feed?since=3&since=9&all", "/users/42/feed", {"id": "42"},
         {"since": "9", "all": ""}),  # the last value of a repeated key wins
        ("/files/docs/read%20me.txt", "/files/docs/read me.txt",
         {"*": "docs/read me.txt"}, {}),
        ("/rooms/lobby?q=a%26b", "/rooms/lobby", {}, {"q": "a&b"}),
    ]
    for target, path, params, query in cases:
        before = len(seen.events)
        with connect(base + target, open_timeout=WAIT) as ws:
            ws.send("ping")
            assert ws.recv(timeout=WAIT) == "ping"
        events = seen.wait_for(lambda ev: len(ev) > before)  # noqa: B023 (called now)
        assert events[-1] == ("request", path, params, query), target


def test_unsafe_parameters_get_404(make_server):
    seen = Recorder()
    server = make_server([_recording_block("/rooms/:room", seen),
                          _recording_block("/files/*", seen)])
    base = f"ws://127.0.0.1:{server.port}"
    for target in ("/rooms/..", "/rooms/%2E%2E", "/rooms/", "/files/..%2Fsecret",
                   "/files/a/../../etc", "/files//etc/passwd", "/rooms/%2E%2E%2Fx"):
        with pytest.raises(InvalidStatus) as info:
            connect(base + target, open_timeout=WAIT)
        assert info.value.status == 404, target
    assert seen.events == []
