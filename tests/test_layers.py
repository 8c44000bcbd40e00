"""The layer rule of docs/architecture.md, enforced: imports point down (lazy imports inside functions
included), no module-level import cycle, and the plugin tables that replace upward imports are complete."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "slimfuse"


def layers() -> dict[str, int]:
    """``slimfuse.x`` -> its layer number, read from the doc's table (``| N | `x`, `y` | ... |``)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    out = {}
    for n, names in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.M):
        for name in re.findall(r"`([\w.]+)`", names):
            out[f"slimfuse.{name}"] = int(n)
    return out


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = modules()
LAYERS = layers()


def layer_of(module: str) -> int | None:
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def imports(module: str, *, module_level: bool):
    """(line, imported slimfuse module) for every import in ``module``; lazy ones too unless ``module_level``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

    def targets(node):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - node.level + 1]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            return [n for n in names if n in MODULES] or ([target] if target in MODULES else [])
        return [a.name for a in node.names if a.name in MODULES]

    nodes = []
    if module_level:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                nodes += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    else:
        type_checking = [n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
        skip = {id(n) for block in type_checking for n in ast.walk(block)}
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]
    for node in nodes:
        for t in targets(node):
            if t != module and not module.startswith(t + "."):
                yield node.lineno, t


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m != "slimfuse" and layer_of(m) is None]
    assert not missing, f"docs/architecture.md's layer table does not place: {missing}"


def test_imports_point_down():
    upward = []
    for m in MODULES:
        if m == "slimfuse":  # the package face: lazy names only
            continue
        for line, t in imports(m, module_level=False):
            if t == "slimfuse":
                continue
            if layer_of(t) > layer_of(m):
                upward.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} (layer {layer_of(t)} > "
                              f"{layer_of(m)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_level_import_cycle():
    edges = {m: {t for _, t in imports(m, module_level=True)} for m in MODULES}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in MODULES:
        if m not in index:
            visit(m)
    assert not cycles, f"module-level import cycles: {cycles}"


def test_import_slimfuse_and_the_cli_stay_light():
    """`slimfuse --help` answers without importing torch: the CLI imports only the configs."""
    import subprocess
    import sys

    heavy = "('torch', 'sklearn', 'onnx', 'onnxruntime')"
    code = f"import sys, slimfuse.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for args in (["--help"], ["prune", "--help"], ["train", "-d", "digits", "--epoch", "3", "-o", "x"],
                 ["train", "-d", "digits", "--epochs", "0", "-o", "x"],
                 ["quantize", "m", "--scheme", "int3", "-o", "x"]):
        code = (f"import sys, slimfuse.cli as c\ntry:\n    c.app({args!r}, prog_name='slimfuse')\n"
                "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert run.stdout.strip().splitlines()[-1] == "False", (args, run.stdout, run.stderr)


@pytest.mark.parametrize("table", ["architectures", "codecs", "data sets"])
def test_plugin_tables_name_every_registration(table):
    """The string tables that stand for upward imports name a module that really registers each entry."""
    import importlib

    import slimfuse  # noqa: F401
    from slimfuse.data import readers
    from slimfuse.models import artifact, zoo

    if table == "architectures":
        providers, registry = zoo.PROVIDERS, zoo.ARCHS
    elif table == "codecs":
        providers, registry = artifact.PROVIDERS, artifact.CODECS
    else:
        for name, ref in readers.TEXT.items():
            module, _, fn = ref.partition(":")
            assert callable(getattr(importlib.import_module(module), fn)), name
        return
    for name, module in providers.items():
        importlib.import_module(module)
        assert name in registry, f"{module} does not register {name!r}"
    for m in MODULES:  # every registration above the registry's own layer has a provider entry
        text = MODULES[m].read_text()
        kind = r"register\(\"([\w-]+)\"\)" if table == "architectures" else r"register_codec\((?:\"([\w-]+)\"|CODEC)"
        for found in re.findall(kind, text):
            if found and m not in ("slimfuse.models.zoo", "slimfuse.models.artifact"):
                assert found in providers, f"{m} registers {found!r}, which {table} providers do not name"


def test_every_public_name_resolves():
    import slimfuse as sf

    assert set(sf.__all__) == {*sf._LAZY, "ArtifactError", "ConfigError", "DataError", "SlimfuseError", "__version__"}
    for name in sf.__all__:
        assert getattr(sf, name) is not None
    import slimfuse.export  # importing the submodules keeps the functions of the same names
    import slimfuse.measure

    assert callable(sf.export) and callable(sf.measure)
