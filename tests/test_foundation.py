import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_platform_folder_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "treelora" / "__init__.py").exists()


def test_import_platform_is_the_standard_library_from_the_repo_root():
    code = "import sys, platform; sys.path.insert(0, '.'); import importlib; print(platform.__file__); print(platform.system())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path, system = out.splitlines()
    assert "site-packages" not in path and str(ROOT) not in path, path
    assert system  # the real module answers
    # and with the repo root first on sys.path before the first import
    code2 = "import sys; sys.path.insert(0, '.'); import platform; print(platform.__file__, hasattr(platform, 'python_version'))"
    out2 = subprocess.run([sys.executable, "-c", code2], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert str(ROOT / "platform") not in out2 and out2.strip().endswith("True"), out2


def test_packages_import_from_the_installed_project():
    import tree_service
    import treelora

    assert pathlib.Path(treelora.__file__).parent == ROOT / "platform" / "treelora"
    assert pathlib.Path(tree_service.__file__).parent == ROOT / "tree_service"


def test_tree_service_imports_nothing_from_treelora():
    import ast

    bad = []
    for path in (ROOT / "tree_service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "treelora"]
    assert not bad, bad


def _modules() -> dict[str, pathlib.Path]:
    root = pathlib.Path(__file__).resolve().parents[1]
    out = {}
    for path in [*(root / "platform").rglob("*.py"), *(root / "tree_service").rglob("*.py"), *(root / "jobs").rglob("*.py")]:
        parts = list(path.relative_to(root).with_suffix("").parts)
        parts = parts[1:] if parts[0] == "platform" else parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _module_imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The project modules ``name`` imports at module level (what makes an import circle)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {c for a in node.names for c in (f"{target}.{a.name}", target) if c in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found - {name}


def test_the_code_keeps_its_shape():
    """Modules of at most 350 lines, functions of at most 60, and no import circle between modules
    (a package importing its own submodules is not one)."""
    import ast

    modules = _modules()
    for name, path in modules.items():
        text = path.read_text()
        assert text.count("\n") <= 350, f"{path} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, f"{path}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines"
    graph = {n: {t for t in _module_imports(n, p, modules) if not t.startswith(n + ".") and not n.startswith(t + ".")}
             for n, p in modules.items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(t == goal or (t not in seen and not seen.add(t) and reaches(t, goal, seen)) for t in graph[start])

    circles = sorted(n for n in graph if reaches(n, n, set()))
    assert not circles, f"import circles through {circles}"
