"""The layering of the package: each layer imports only the layers below it (imports inside functions
included), the host-side packages import no JAX, nothing imports the benchmarks but the command line,
no import cycle, no module over 500 lines, and nothing named `metrics` or `clustering` at the top level.

The layers, lowest first (docs/architecture.md):
    errors, constants                 the error boundary and shared names (stdlib only)
    metrics, clustering, plots        host side: numpy, scikit-learn, matplotlib; no JAX
    core (models, weights, data, ...) one forward or backward pass
    training                          the training loop, alignment loss, label edits, Hessians
    jobs                              commands that write a directory (extract, cams, audit, explain, ...)
    paper                             analysis, tables, reproduce
    api                               the public Python API (resnet_jax.__all__)
    cli                               the command line, built on the API
    benchmarks                        benches and the device check (imported by the cli's bench group only)
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"resnet_jax": "resnet_jax", "resnet_jax.metrics": "metrics", "resnet_jax.clustering": "clustering",
           "resnet_jax.benchmarks": "benchmarks"}
RANK = {"errors": 0, "constants": 0, "_names": 0, "metrics": 1, "clustering": 1, "plots": 1, "core": 2,
        "training": 3, "jobs": 4, "paper": 5, "api": 6, "benchmarks": 6, "cli": 7}
MAX_LINES = 500


@pytest.mark.parametrize("modules", ["resnet_jax.metrics.similarity, resnet_jax.metrics.agreement, "
                                     "resnet_jax.metrics.saliency, resnet_jax.metrics.attribution, "
                                     "resnet_jax.metrics.detection",
                                     "resnet_jax.clustering.cluster, resnet_jax.clustering.misclassified, "
                                     "resnet_jax.plots", "resnet_jax"])
def test_host_packages_import_no_jax(modules):
    code = f"import sys; import {modules}; print('jax' in sys.modules, 'flax' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


def test_no_top_level_metrics_or_clustering_outside_the_checkout(tmp_path):
    """Installed inside our namespace: `import metrics` fails where the checkout is not on the path."""
    for name in ("metrics", "clustering", "benchmarks"):
        res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=60)
        assert res.returncode != 0 and "No module named" in res.stderr, (name, res.stderr)
    res = subprocess.run([sys.executable, "-c", "import resnet_jax.metrics.similarity as s; print(s.__name__)"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.stdout.strip() == "resnet_jax.metrics.similarity", res.stderr


def _modules():
    """{dotted module name: path} of resnet_jax and the folders installed inside it."""
    out = {}
    for package, folder in FOLDERS.items():
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), os.path.join(ROOT, folder))[:-3]
                dotted = ".".join([package] + [p for p in rel.split(os.sep) if p != "__init__"])
                if package == "resnet_jax" and dotted.split(".")[1:2] and dotted.split(".")[1] in FOLDERS:
                    continue
                out[dotted] = os.path.join(dirpath, name)
    return out


def _imports(name, path, known):
    """The package's modules that module `name` imports anywhere in its body."""
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


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "api"  # resnet_jax/__init__ re-exports the API


def test_every_module_has_a_layer():
    unknown = sorted(m for m in _modules() if _layer(m) not in RANK)
    assert not unknown, f"modules outside the layers of docs/architecture.md: {unknown}"


def test_layers_import_only_downwards():
    mods = _modules()
    wrong = []
    for m, p in mods.items():
        for n in _imports(m, p, mods):
            if n == "resnet_jax" or m == "resnet_jax":
                continue
            a, b = _layer(m), _layer(n)
            if a == b:
                continue
            if RANK[b] > RANK[a]:
                wrong.append(f"{m} ({a}) imports {n} ({b})")
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_bench_group_imports_the_benchmarks():
    mods = _modules()
    importers = sorted(m for m, p in mods.items() if _layer(m) not in ("benchmarks",)
                       and any(_layer(n) == "benchmarks" for n in _imports(m, p, mods)))
    assert importers == ["resnet_jax.cli.bench"], importers


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
    long = {m: n for m, p in mods.items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, long
