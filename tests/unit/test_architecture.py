"""The layout is the architecture: layers import downwards only, nothing imports in a cycle, every
module imports on its own, and no module grows past about 600 lines without a reason.

Layers, each importing only those below it:

    adamax_client -> adamax_wire
    adamax_server: cli -> transport, storage -> ops (metrics, logging) -> coordination -> optim
                   transport -> adamax_wire; errors is imported from coordination upwards

``optim`` (the math) imports neither grpc, nor protobuf, nor the wire package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"adamax_server": ROOT / "server", "adamax_client": ROOT / "client", "adamax_wire": ROOT / "wire"}
GENERATED = ("adamax_wire.proto",)
MAX_LINES = 640  # "about 600"; a module past it must be listed below with the one idea it holds
LONG_MODULES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for package, base in PACKAGES.items():
        for path in sorted((base / package).rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (module level, functions and TYPE_CHECKING alike)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the layout uses absolute imports")
    return names


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        if name.startswith(GENERATED):
            continue
        graph[name] = {n for n in _imports(path) if n in MODULES and n != name and not n.startswith(GENERATED)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "adamax_server" and len(parts) > 1:
        return f"server.{parts[1]}"
    return parts[0]


# layer -> layers it must never import
FORBIDDEN = {
    "adamax_wire": {"adamax_server", "adamax_client"},
    "adamax_client": {"adamax_server"},
    "server.optim": {"grpc", "adamax_wire", "adamax_client", "google.protobuf", "server.coordination",
                     "server.transport", "server.storage", "server.ops", "server.cli", "server.errors"},
    "server.errors": {"grpc", "server.coordination", "server.transport", "server.storage", "server.ops", "server.cli"},
    "server.coordination": {"grpc", "adamax_client", "adamax_wire", "server.transport", "server.storage",
                            "server.ops", "server.cli"},
    "server.ops": {"adamax_client", "server.transport", "server.storage", "server.cli"},
    "server.storage": {"grpc", "adamax_client", "server.transport", "server.cli"},
    "server.transport": {"adamax_client", "server.cli"},
    # Sharded jobs: shard engine, pairwise norms, hosts and leader over coordination and optim;
    # rpc/server are its transport (grpc and the wire package, never the client); the leader
    # encodes the assembled job in storage's single-server checkpoint format (sharding.assembled).
    "server.sharding": {"adamax_client", "server.cli"},
}

def _layers_of(imported: str) -> set[str]:
    out = {_layer(imported)}
    for external in ("grpc", "google.protobuf"):
        if imported == external or imported.startswith(external + "."):
            out.add(external)
    return out


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(GENERATED)))
def test_layers_import_downwards_only(module):
    forbidden = FORBIDDEN.get(_layer(module), set())
    bad = sorted(n for n in _imports(MODULES[module]) if _layers_of(n) & forbidden)
    assert bad == [], f"{module} ({_layer(module)}) imports {bad}"


def test_the_server_never_imports_private_client_modules():
    for module, path in MODULES.items():
        if module.startswith("adamax_server"):
            private = sorted(n for n in _imports(path) if n.startswith("adamax_client._"))
            assert private == [], f"{module} imports {private}"


def test_modules_stay_readable_in_size():
    long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items() if not m.startswith(GENERATED)}
    long = {m: n for m, n in long.items() if n > MAX_LINES and m not in LONG_MODULES}
    assert long == {}


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter state of our packages (third-party modules stay cached)."""
    names = sorted(m for m in MODULES if not m.endswith("__main__"))
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('adamax_server', 'adamax_client', 'adamax_wire')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    env_path = ":".join(str(p) for p in PACKAGES.values())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_imports_of_the_previous_layout_keep_working():
    script = (
        "import warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from adamax_server import Adamax, RowSparseGradient\n"
        "from adamax_client import RemoteAdamax, RowSparseGradient as R2\n"
        "import adamax_client.checkpoints, adamax_client.errors\n"
        "from adamax_server.cli import main\n"
        "from adamax_server.engine import Adamax as A2\n"
        "from adamax_server.coordinator import Coordinator\n"
        "from adamax_server.server import create_server\n"
        "from adamax_server import schedules\n"
        "from adamax_server.kernels import get_backend\n"
        "from adamax_client._proto.adamax.v1 import adamax_pb2\n"
        "import adamax_wire.proto.adamax.v1.adamax_pb2 as pb\n"
        "assert A2 is Adamax and adamax_pb2 is pb\n"
        "assert schedules.ExponentialDecay.__module__.startswith('adamax_server.optim.schedules')\n"
    )
    env_path = ":".join(str(p) for p in PACKAGES.values())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stdout + proc.stderr
