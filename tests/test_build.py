"""BUILD mirrors the package: every module is in a py_library, every test file has a py_test."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _build_rules():
    """Parse BUILD (Starlark is Python syntax) into {rule kind: [kwargs]}."""
    tree = ast.parse((REPO / "BUILD").read_text())
    rules = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
            rules.setdefault(node.value.func.id, []).append(kwargs)
    return rules


def test_every_module_is_in_a_py_library():
    rules = _build_rules()
    listed = {src for rule in rules.get("py_library", []) for src in rule.get("srcs", []) if src.startswith("mskd_tf/")}
    modules = {str(p.relative_to(REPO)) for p in (REPO / "mskd_tf").rglob("*.py")}
    assert modules - listed == set(), "add these modules to a py_library in BUILD"
    assert listed - modules == set(), "BUILD lists files that do not exist"


def test_every_test_file_has_a_py_test():
    rules = _build_rules()
    tests = {rule["srcs"][0] for rule in rules.get("py_test", [])}
    files = {str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")}
    assert files - tests == set(), "add a py_test for these test files to BUILD"
    assert tests - files == set(), "BUILD has py_tests for files that do not exist"


def test_cli_binary_points_at_run():
    binaries = _build_rules().get("py_binary", [])
    assert any(b.get("main") == "mskd_tf/run.py" for b in binaries)
    deps = {d for b in binaries for d in b.get("deps", [])}
    libraries = {rule["name"] for rule in _build_rules()["py_library"]}
    assert {re.sub("^:", "", d) for d in deps} <= libraries
