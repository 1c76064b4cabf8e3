"""The architecture guard: the layers and their boundaries.

Layout (docs/DESIGN "Layout"): ``flows -> tasks -> cafm_core``; ``infra`` is the local service
stack beside them. Three rules are checked here:

1. ``cafm_core`` is the method only: importing any of its modules must not pull in an
   orchestration, tracking or storage library (checked at run time, in a fresh interpreter).
2. Dependencies point one way (checked statically, by ``ast``): ``cafm_core`` imports nothing
   from ``tasks``/``flows``/``infra``; ``tasks`` nothing from ``flows``/``infra``; ``flows``
   nothing from ``infra``. Imports inside functions count too.
3. Modules talk through public names (checked statically): no production module imports a
   private name (one leading underscore, not a dunder) of another project module, imports a
   private module from outside the package that owns it, or reads ``module._name`` on an
   imported project module. Test files may not either; they may monkeypatch a private
   attribute by its name as a string (``monkeypatch.setattr(module, "_name", ...)``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("cafm_core", "tasks", "flows", "infra")
SERVICE_MODULES = ("prefect", "ray", "mlflow", "s3fs", "boto3", "botocore", "accelerate")

# What each production package must not import.
FORBIDDEN = {
    "cafm_core": ("tasks", "flows", "infra"),
    "tasks": ("flows", "infra"),
    "flows": ("infra",),
    "infra": (),
}


# --- 1. runtime ---------------------------------------------------------------------------


def test_cafm_core_imports_no_orchestration_tracking_or_storage_library():
    code = (
        "import sys, importlib, pkgutil, cafm_core\n"
        "for m in pkgutil.walk_packages(cafm_core.__path__, 'cafm_core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print([m for m in {SERVICE_MODULES!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_ray_worker_setup_hook_imports_nothing_heavy():
    """Ray runs the hook in every worker process of the job (controller, helper actors, data
    tasks): importing torch there cost about 0.9 s of CPU per process, 3.5 s per training
    stage's start with 2 workers on 2 cores (docs/benchmarks.md)."""
    code = (
        "import sys, tasks.ray_worker_setup as hook\n"
        "hook.quiet_worker_logs()\n"
        "print(sorted(m for m in ('torch', 'numpy', 'ray', 'prefect', 'mlflow', 'cafm_core') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- static analysis helpers --------------------------------------------------------------


def _is_private(name: str) -> bool:
    """One leading underscore (``_x``, ``__x``), but not a dunder (``__x__``) nor ``_`` alone."""
    return name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))


def _in_project(module: str) -> bool:
    return module.split(".")[0] in LAYERS


@dataclass(frozen=True)
class Tree:
    """A source tree with the four production packages at ``root``."""

    root: Path

    def files(self, *tops: str) -> list[Path]:
        out: list[Path] = []
        for top in tops:
            out.extend(p for p in sorted((self.root / top).rglob("*.py")) if "__pycache__" not in p.parts)
        return out

    def module_name(self, path: Path) -> str:
        parts = list(path.relative_to(self.root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)

    def is_module(self, module: str) -> bool:
        """True when ``module`` is a production module or package in this tree."""
        if not _in_project(module):
            return False
        base = self.root.joinpath(*module.split("."))
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()

    def resolve(self, path: Path, module: str | None, level: int) -> str:
        """Absolute module name of ``from <level dots><module> import ...`` written in ``path``."""
        if level == 0:
            return module or ""
        package = self.module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (level - 1)]
        return ".".join([*package, module] if module else package)

    def imports(self, path: Path, tree: ast.AST) -> Iterator[tuple[int, str, tuple[str, ...]]]:
        """(line, absolute module, imported names) for every import, nested ones included.

        ``import a.b`` gives (``a.b``, ()); ``from a import b, c`` gives (``a``, ("b", "c")).
        """
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield node.lineno, alias.name, ()
            elif isinstance(node, ast.ImportFrom):
                yield node.lineno, self.resolve(path, node.module, node.level), tuple(a.name for a in node.names)


def _parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@dataclass(frozen=True)
class Found:
    where: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.what}"


def _found(tree: Tree, path: Path, line: int, what: str) -> Found:
    return Found(str(path.relative_to(tree.root)), line, what)


# --- 2. layering --------------------------------------------------------------------------


def layer_violations(tree: Tree) -> list[Found]:
    found = []
    for layer, banned in FORBIDDEN.items():
        for path in tree.files(layer):
            for line, module, _ in tree.imports(path, _parse(path)):
                if module.split(".")[0] in banned:
                    found.append(_found(tree, path, line, f"{layer} imports {module}"))
    return found


def test_dependencies_point_one_way_flows_to_tasks_to_cafm_core():
    tree = Tree(ROOT)
    for layer in LAYERS:  # not passing because it looked at nothing
        assert tree.files(layer), f"no .py files found under {layer}/"
    found = layer_violations(tree)
    assert not found, (
        "layer boundary crossed (allowed: flows -> tasks -> cafm_core; none of them imports infra):\n"
        + "\n".join(map(str, found))
    )


# --- 3. private names ---------------------------------------------------------------------


def _module_bindings(tree: Tree, path: Path, syntax: ast.AST) -> dict[str, str]:
    """Local names bound to project modules by imports: name -> absolute module name.

    ``import a.b`` binds ``a``; ``import a.b as m`` binds ``m`` to ``a.b``;
    ``from a import b`` binds ``b`` to ``a.b`` when ``a.b`` is a module.
    """
    bound: dict[str, str] = {}
    for node in ast.walk(syntax):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _in_project(alias.name):
                    continue
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    bound[head] = head
        elif isinstance(node, ast.ImportFrom):
            module = tree.resolve(path, node.module, node.level)
            if _in_project(module):
                for alias in node.names:
                    if tree.is_module(f"{module}.{alias.name}"):
                        bound[alias.asname or alias.name] = f"{module}.{alias.name}"
    return bound


def _private_module_owner(module: str) -> str | None:
    """``a.b`` for the private module ``a.b._c`` (or ``a.b._c.d``); None for public modules."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            return ".".join(parts[:i])
    return None


def _may_use_private_module(importer: str | None, module: str) -> bool:
    """A private module ``a.b._c`` is private to its package ``a.b``: modules inside ``a.b`` may use it."""
    owner = _private_module_owner(module)
    if owner is None:
        return True
    return importer is not None and (importer == owner or importer.startswith(owner + "."))


def _outer_attributes(syntax: ast.AST) -> Iterator[tuple[ast.Attribute, str, list[str]]]:
    """Each outermost attribute chain ``name.a.b.c`` as (node, name, [a, b, c])."""
    inner: set[int] = set()
    for node in ast.walk(syntax):  # breadth-first: an outer attribute is seen before its inner ones
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        attrs: list[str] = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            inner.add(id(cur))
            attrs.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name):
            yield node, cur.id, attrs[::-1]


def private_uses(tree: Tree, path: Path, *, production: bool) -> list[Found]:
    """Private names and modules of other project modules that ``path`` imports or reads."""
    syntax = _parse(path)
    here = tree.module_name(path) if production else None
    found: set[Found] = set()

    for line, module, names in tree.imports(path, syntax):
        if not _in_project(module):
            continue
        for mod in [module] + [f"{module}.{n}" for n in names if tree.is_module(f"{module}.{n}")]:
            if not _may_use_private_module(here, mod):
                found.add(_found(tree, path, line, f"imports private module {mod}"))
        for name in names:
            if _is_private(name) and module != here and not tree.is_module(f"{module}.{name}"):
                found.add(_found(tree, path, line, f"imports private name {name} from {module}"))

    bound = _module_bindings(tree, path, syntax)
    for node, base, attrs in _outer_attributes(syntax):
        if base not in bound:
            continue
        module, spelled = bound[base], base
        for attr in attrs:
            spelled += "." + attr
            if tree.is_module(f"{module}.{attr}"):
                module = f"{module}.{attr}"
                if not _may_use_private_module(here, module):
                    found.add(_found(tree, path, node.lineno, f"uses private module {module} ({spelled})"))
                    break
                continue
            if _is_private(attr) and module != here:
                found.add(_found(tree, path, node.lineno, f"uses private name {attr} of {module} ({spelled})"))
            break
    return sorted(found, key=lambda f: (f.where, f.line, f.what))


def test_production_modules_use_only_public_names_of_other_project_modules():
    tree = Tree(ROOT)
    found = [f for path in tree.files(*LAYERS) for f in private_uses(tree, path, production=True)]
    assert not found, (
        "private names used across modules (make them public, or keep them in the one module using them):\n"
        + "\n".join(map(str, found))
    )


def test_test_files_do_not_import_private_names_of_project_modules():
    tree = Tree(ROOT)
    found = [f for path in tree.files("tests") for f in private_uses(tree, path, production=False)]
    assert not found, (
        "tests reach into private names of project modules (test the public API; monkeypatching by "
        'name as a string, monkeypatch.setattr(module, "_name", ...), is allowed):\n' + "\n".join(map(str, found))
    )


# --- the checkers themselves --------------------------------------------------------------


def _fake_tree(root: Path) -> Tree:
    for layer in LAYERS:
        (root / layer).mkdir()
        (root / layer / "__init__.py").touch()
    (root / "tasks" / "train").mkdir()
    (root / "tasks" / "train" / "__init__.py").write_text("def _fit(): ...\ndef fit(): ...\n")
    (root / "tasks" / "train" / "configs.py").touch()
    (root / "tasks" / "_hidden.py").write_text("x = 1\n")
    (root / "tests").mkdir()
    return Tree(root)


def _check(tree: Tree, source: str, name: str = "flows/probe.py", *, production: bool = True) -> list[str]:
    path = tree.root / name
    path.write_text(source)
    return [f.what for f in private_uses(tree, path, production=production)]


def test_private_checker_flags_each_form_of_reaching_into_another_module(tmp_path):
    tree = _fake_tree(tmp_path)
    assert _check(tree, "from tasks.train import fit, _fit\n") == ["imports private name _fit from tasks.train"]
    assert _check(tree, "def f():\n    from tasks.train import _fit as g\n") == [
        "imports private name _fit from tasks.train"
    ]
    assert _check(tree, "import tasks._hidden\n") == ["imports private module tasks._hidden"]
    assert _check(tree, "from tasks import _hidden\n") == ["imports private module tasks._hidden"]
    assert _check(tree, "from tasks import train\ntrain._fit()\n") == [
        "uses private name _fit of tasks.train (train._fit)"
    ]
    assert _check(tree, "import tasks.train as t\nt._fit()\n") == ["uses private name _fit of tasks.train (t._fit)"]
    assert _check(tree, "import tasks.train\ntasks.train._fit()\n") == [
        "uses private name _fit of tasks.train (tasks.train._fit)"
    ]
    found = _check(tree, "from tasks import train\ntrain._fit()\n", "tests/test_probe.py", production=False)
    assert found == ["uses private name _fit of tasks.train (train._fit)"]


def test_private_checker_allows_public_names_dunders_strings_and_a_packages_own_private_modules(tmp_path):
    tree = _fake_tree(tmp_path)
    assert _check(tree, "from tasks.train import fit\nfrom tasks import train\ntrain.fit()\ntrain.__name__\n") == []
    assert _check(tree, "import os\nos._exit\nfrom collections import _x\n") == []  # not project modules
    source = 'from tasks import train\ndef test_x(monkeypatch):\n    monkeypatch.setattr(train, "_fit", 1)\n'
    assert _check(tree, source, "tests/test_probe.py", production=False) == []
    assert _check(tree, "from tasks import _hidden\nfrom . import _hidden as h\n", "tasks/user.py") == []
    assert _check(tree, "def _own(): ...\n", "tasks/train/configs.py") == []
    # a test file is never inside the package that owns a private module
    assert _check(tree, "from tasks import _hidden\n", "tests/test_probe.py", production=False) == [
        "imports private module tasks._hidden"
    ]


def test_layer_checker_finds_nested_and_relative_upward_imports(tmp_path):
    tree = _fake_tree(tmp_path)
    (tmp_path / "tasks" / "train" / "configs.py").write_text("def f():\n    from flows.pipeline import x\n")
    (tmp_path / "flows" / "cli.py").write_text("from tasks.train import fit\nimport infra.stack\n")
    (tmp_path / "cafm_core" / "m.py").write_text("from ..tasks import train\n")
    assert sorted(map(str, layer_violations(tree))) == [
        "cafm_core/m.py:1: cafm_core imports tasks",
        "flows/cli.py:2: flows imports infra.stack",
        "tasks/train/configs.py:2: tasks imports flows.pipeline",
    ]
    assert tree.resolve(tmp_path / "tasks" / "train" / "configs.py", "shards", 1) == "tasks.train.shards"
    assert tree.resolve(tmp_path / "tasks" / "train" / "__init__.py", "configs", 1) == "tasks.train.configs"
    assert tree.resolve(tmp_path / "tasks" / "train" / "configs.py", None, 2) == "tasks"
