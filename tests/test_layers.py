"""The layering of the packages: host-side packages import no JAX, resnet_jax has no import cycle
(imports inside functions included) and no module over 600 lines."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "resnet_jax")


@pytest.mark.parametrize("modules", ["metrics.similarity, metrics.agreement, metrics.saliency, metrics.attribution",
                                     "clustering.cluster, clustering.misclassified, clustering.figures"])
def test_host_packages_import_no_jax(modules):
    code = f"import sys; import {modules}; print('jax' in sys.modules, 'flax' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


def _modules():
    """{dotted module name: path} of resnet_jax."""
    out = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return out


def _imports(name, path, known):
    """The resnet_jax modules that module `name` imports anywhere in its body."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                found.add(full if full in known else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def test_no_import_cycle_and_no_long_module():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of the submodules.
    for m in graph:
        graph[m] -= {p for p in graph if m.startswith(p + ".")}
    state: dict = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    long = {m: n for m, p in mods.items() if (n := sum(1 for _ in open(p))) > 600}
    assert not long, long
