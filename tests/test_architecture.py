"""The layout of shared/DESIGN.md ("Layers"), checked by walking every module's syntax tree:
dependencies point down the layers, only the pack writer writes a manifest, modules and
functions stay small. Each checker is also run on a planted offender, so a check that could
never fail would fail here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qmerge"

# Bottom to top. A module may import its own layer and the layers below it, never above.
LAYERS: list[tuple[str, ...]] = [
    ("qmerge.errors", "qmerge.version", "qmerge.registry", "qmerge.dtypes"),
    ("qmerge.ops",),
    ("qmerge.format", "qmerge.codecs"),
    ("qmerge.routing", "qmerge.merge"),
    ("qmerge.nn",),
    ("qmerge.verbs",),
    ("qmerge.cli", "qmerge.serve", "qmerge.__main__"),
    ("qmerge",),  # the front door, qmerge/__init__.py
]
WRITER = "qmerge.format.writer"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def layer(module: str) -> int:
    """The layer of a qmerge module: its longest matching prefix in LAYERS."""
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank < 0:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS")
    return rank


def modules() -> dict[str, tuple[Path, str]]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = (path, path.read_text())
    return out


def _imported(module: str, tree: ast.AST, known: set[str]) -> list[tuple[int, str]]:
    """(line, qmerge module) of every import in `tree`; `from qmerge import x` counts as
    qmerge.x where x is a module, else as qmerge (the front door)."""
    out = []
    package = (
        module if (PKG.parent / Path(*module.split("."))).is_dir() else module.rpartition(".")[0]
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qmerge"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "qmerge":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return out


def layer_violations(sources: dict[str, str]) -> list[str]:
    known = set(sources) | set(modules())
    bad = []
    for module, text in sources.items():
        for line, target in _imported(module, ast.parse(text), known):
            if layer(target) > layer(module):
                bad.append(f"{module}:{line} imports {target} (a higher layer)")
    return bad


_WRITES = {"write_text", "write_bytes", "atomic_write_bytes", "atomic_file", "open"}


def manifest_writers(sources: dict[str, str]) -> list[str]:
    """Modules other than the pack writer that create or write a manifest: they call the
    manifest's serialiser or constructor (`dumps`, `new`), or write to a path spelled with
    its name (`manifest.NAME` or "manifest.json")."""
    bad = []
    for module, text in sources.items():
        if module in (WRITER, "qmerge.format.manifest"):
            continue
        tree = ast.parse(text)
        aliases = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
            and n.module in ("qmerge.format", "qmerge.format.manifest")
            for a in n.names
            if a.name in ("manifest", "mf")
        }
        aliases |= {"mf", "manifest"}
        direct = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "qmerge.format.manifest"
            for a in n.names
            if a.name in ("dumps", "new")
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr in ("dumps", "new")
                and isinstance(f.value, ast.Name)
                and f.value.id in aliases
            ) or (isinstance(f, ast.Name) and f.id in direct):
                bad.append(f"{module}:{node.lineno} builds a manifest")
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in _WRITES and _names_manifest(node):
                bad.append(f"{module}:{node.lineno} writes manifest.json")
    return bad


def _names_manifest(call: ast.Call) -> bool:
    for n in ast.walk(call):
        if isinstance(n, ast.Constant) and n.value == "manifest.json":
            return True
        if isinstance(n, ast.Attribute) and n.attr == "NAME":
            return True
    return False


def sizes(sources: dict[str, str]) -> list[str]:
    bad = []
    for module, text in sources.items():
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            bad.append(f"{module}: {n} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    bad.append(
                        f"{module}.{node.name}: {length} lines (at most {MAX_FUNCTION_LINES})"
                    )
    return bad


SOURCES = {m: text for m, (_, text) in modules().items()}


def test_dependencies_point_down_the_layers():
    assert layer_violations(SOURCES) == []


def test_the_layer_check_catches_an_upward_import():
    planted = {
        "qmerge.codecs.planted": "from qmerge.verbs.packs import residual\n",
        "qmerge.merge.planted": "import qmerge\n",
        "qmerge.format.planted": "from qmerge import nn\n",
    }
    assert len(layer_violations(planted)) == 3


def test_only_the_pack_writer_writes_a_manifest():
    assert manifest_writers(SOURCES) == []
    assert any("dumps" in line for line in SOURCES[WRITER].splitlines())


@pytest.mark.parametrize(
    "code",
    [
        "from qmerge.format import manifest as mf\n"
        "def f(p, m):\n    (p / mf.NAME).write_bytes(mf.dumps(m))\n",
        "from pathlib import Path\ndef f(p):\n    Path(p, 'manifest.json').write_text('{}')\n",
        "from qmerge.format.manifest import new\ndef f(fp):\n    return new(fp, 'x')\n",
    ],
)
def test_the_writer_check_catches_another_writer(code):
    assert manifest_writers({"qmerge.verbs.planted": code})


def test_modules_and_functions_stay_small():
    assert sizes(SOURCES) == []
    assert sizes({"qmerge.planted": "def f():\n" + "    x = 1\n" * 90})
