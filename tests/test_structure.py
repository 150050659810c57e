"""The package's shape: imports point one way (no circles, module-level or inside functions), CLI modules use
the library and the shared helper only, and each concept has one home."""
from __future__ import annotations

import ast
from pathlib import Path

import ivpt

ROOT = Path(ivpt.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module → the ivpt modules it imports anywhere in its body (absolute names, packages included)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c != name}
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_package_reexports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ importing its own submodules is how it re-exports them, not a dependency of the
    # package's code on itself: drop edges from a package to modules inside it.
    return {m: {t for t in deps if not t.startswith(m + ".")} for m, deps in graph.items()}


def test_no_import_circles():
    assert _cycles(_without_package_reexports(_imports())) == []


def test_dependencies_point_one_way():
    graph = _imports()

    def deps(prefix: str) -> set[str]:
        return {t for m, ts in graph.items() if m == prefix or m.startswith(prefix + ".") for t in ts}

    assert not {t for t in deps("ivpt.models") if t.startswith(("ivpt.engine", "ivpt.eval", "ivpt.cli"))}
    assert not {t for t in deps("ivpt.eval") if t.startswith(("ivpt.engine", "ivpt.cli"))}
    assert not {t for t in deps("ivpt.engine") if t.startswith("ivpt.cli")}
    library = [m for m in graph if not m.startswith("ivpt.cli")]
    assert not [m for m in library if any(t.startswith("ivpt.cli") for t in graph[m])]


def test_cli_modules_import_no_other_cli_module_but_the_shared_helper():
    graph = _imports()
    for module, targets in graph.items():
        if module.startswith("ivpt.cli.") and module not in ("ivpt.cli.common", "ivpt.cli.main"):
            # `python -m ivpt.cli` (cli/__main__.py) runs the dispatcher, cli/main.py, which imports each command.
            allowed = ("ivpt.cli", "ivpt.cli.common") + (("ivpt.cli.main",) if module == "ivpt.cli.__main__" else ())
            others = {t for t in targets if t.startswith("ivpt.cli") and t not in allowed}
            assert others == set(), (module, others)


def test_one_home_for_each_concept():
    """Dataset dispatch, device resolution, autocast, the accuracy loop, the KPR fit and the model-kind list are
    each defined in exactly one module."""
    definitions: dict[str, list[str]] = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                definitions.setdefault(node.name, []).append(_module_name(path))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        definitions.setdefault(t.id, []).append(_module_name(path))
    homes = {
        "open_dataset": "ivpt.data.dispatch", "dataset_class": "ivpt.data.dispatch",
        "DATASET_FORMATS": "ivpt.formats", "register_format": "ivpt.formats", "register_metric": "ivpt.eval.registry",
        "resolve_device": "ivpt.runtime", "autocast": "ivpt.runtime", "evaluate_accuracy": "ivpt.eval.runner",
        "fit_keypoint_regressor": "ivpt.metrics.keypoints", "MODEL_KINDS": "ivpt.config.model",
        "register_model": "ivpt.models.registry", "config_changes": "ivpt.config.run", "run_config": "ivpt.runs",
        "reuse_state": "ivpt.runs", "IMAGENET_MEAN": "ivpt.config.sections", "IMAGENET_STD": "ivpt.config.sections",
        "MODELS": "ivpt.models.registry", "create_model": "ivpt.models.registry", "load_run": "ivpt.runs",
    }
    for name, home in homes.items():
        assert definitions.get(name) == [home], (name, definitions.get(name))
