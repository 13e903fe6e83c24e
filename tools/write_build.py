"""Regenerate BUILD from the tree: one py_library for the package, a py_test per
test file, the CLI py_binary. Run after adding a module or test:
    .venv/bin/python tools/write_build.py
tests/test_build.py fails when BUILD and the tree disagree."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _list(items, indent=8):
    pad = " " * indent
    return "[\n" + "".join(f'{pad}"{i}",\n' for i in items) + " " * (indent - 4) + "]"


def main():
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "mskd_tf").rglob("*.py"))
    tests = sorted(p for p in (REPO / "tests").glob("test_*.py"))
    helpers = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("*.py") if not p.name.startswith("test_"))
    out = [
        "# Bazel targets mirroring the package (kept true by tests/test_build.py;",
        "# regenerate with tools/write_build.py). Third-party deps come from the pip",
        "# requirements in setup.py (rules_python's pip_parse, named @pypi).",
        "",
        'load("@rules_python//python:defs.bzl", "py_binary", "py_library", "py_test")',
        "",
        "py_library(",
        '    name = "mskd_tf",',
        f"    srcs = {_list(modules)},",
        '    visibility = ["//visibility:public"],',
        ")",
        "",
        "py_binary(",
        '    name = "mskd-tf",',
        '    srcs = ["mskd_tf/run.py"],',
        '    main = "mskd_tf/run.py",',
        '    deps = [":mskd_tf"],',
        ")",
        "",
        "py_library(",
        '    name = "test_support",',
        '    testonly = True,',
        f"    srcs = {_list(helpers)},",
        ")",
    ]
    for test in tests:
        out += ["", "py_test(", f'    name = "{test.stem}",', f'    srcs = ["{test.relative_to(REPO)}"],',
                f'    main = "{test.relative_to(REPO)}",', '    deps = [":mskd_tf", ":test_support"],',
                '    size = "medium",', ")"]
    (REPO / "BUILD").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
