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
