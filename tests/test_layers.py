"""The shape of the package: layers that import one way, no private names
across modules, a sans-IO protocol layer, and exports that exist.

These read the source (the ``import`` statements, with :mod:`ast`) rather
than trusting a docstring: a new import that breaks the layering fails here.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

import gaman_sync

PACKAGE = Path(gaman_sync.__file__).resolve().parent

# Lower numbers are lower layers; a module may import only its own layer and
# those below. The leaves (exceptions, options, the C helper) serve them all.
RANKS = {
    "exceptions": 0, "options": 0, "version": 0, "_speedups": 0,
    "protocol": 1,
    "io": 2,
    # Brokers carry bytes between processes on named channels (their own
    # threads, a client library): below the server that publishes through
    # them, knowing nothing of connections.
    "broker": 2,
    "connection": 3,
    "strategies": 4,
    "server": 4, "client": 4,
    "testing": 5,
    "app": 5,
    "wsgi": 5,
    "cli": 6,
    "__init__": 7, "__main__": 7,
}


def modules() -> Iterator[Tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield ".".join(parts), path


def layer(dotted: str) -> str:
    return dotted.split(".")[0]


def imports(dotted: str, path: Path) -> Iterator[Tuple[int, str, str]]:
    """(line, module imported within gaman_sync, name) for each imported name."""
    tree = ast.parse(path.read_text(), str(path))
    package = dotted.split(".")[:-1] if path.name != "__init__.py" else dotted.split(".")
    if path.name == "__init__.py":
        package = dotted.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("gaman_sync"):
                target = node.module[len("gaman_sync."):] if "." in node.module else ""
            else:
                continue
            for alias in node.names:
                yield node.lineno, target, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gaman_sync."):
                    yield node.lineno, alias.name[len("gaman_sync."):], ""


def test_every_module_has_a_layer():
    assert {layer(d) for d, _ in modules()} <= set(RANKS)


@pytest.mark.parametrize("dotted, path", list(modules()), ids=lambda v: str(v))
def test_imports_flow_down_and_never_reach_private_names(dotted, path):
    mine = layer(dotted)
    for line, target, name in imports(dotted, path):
        target_layer = layer(target) if target else layer(name)
        if target == "" and name:  # from . import X at the top of the package
            target_layer = layer(name)
        assert RANKS[target_layer] < RANKS[mine] or target_layer == mine, \
            f"{path.name}:{line} ({mine}) imports {target or name} ({target_layer}), a layer above"
        private = name.startswith("_") and not name.startswith("__")
        if private and not target.endswith("_speedups"):
            pytest.fail(f"{path.name}:{line} imports the private name {name} from {target}")


def test_the_protocol_layer_imports_no_socket_and_no_thread():
    code = ("import sys, gaman_sync.protocol; "
            "print(sorted(m for m in ('socket', 'threading', 'selectors', 'ssl') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_every_exported_name_exists_and_is_listed():
    for name in gaman_sync.__all__:
        assert getattr(gaman_sync, name) is not None, name
    public = {n for n in dir(gaman_sync) if not n.startswith("_")
              and not isinstance(getattr(gaman_sync, n), type(gaman_sync))}
    assert public - {"annotations", "TYPE_CHECKING", "Any"} <= set(gaman_sync.__all__)
    with pytest.raises(AttributeError):
        gaman_sync.no_such_name  # noqa: B018


@pytest.mark.parametrize("sub", ["app", "protocol", "io", "broker", "connection", "server",
                                 "client", "wsgi"])
def test_each_layer_exports_what_it_lists(sub):
    module = importlib.import_module(f"gaman_sync.{sub}")
    assert module.__all__, sub
    for name in module.__all__:
        assert hasattr(module, name), f"gaman_sync.{sub}.{name}"


def test_the_exception_tree_is_as_documented():
    from gaman_sync import exceptions as e
    assert issubclass(e.ConnectionClosedOK, e.ConnectionClosed)
    assert issubclass(e.ConnectionClosedError, e.ConnectionClosed)
    assert issubclass(e.ConnectionClosed, e.WebSocketError)
    assert issubclass(e.SendTimeout, TimeoutError) and issubclass(e.SendTimeout, e.WebSocketError)
    for name in ("InvalidURI", "InvalidStatus", "InvalidHeader", "InvalidMessage",
                 "HandshakeTimeout"):
        assert issubclass(getattr(e, name), e.InvalidHandshake), name
        assert name in e.__doc__, name
    assert issubclass(e.HandshakeTimeout, TimeoutError)
    assert issubclass(e.InvalidHandshake, e.WebSocketError)
