"""Every module imports on its own, in a fresh process: no import cycle, no hidden order.

A cycle held together by import order (or by ``TYPE_CHECKING``) breaks as soon as a newcomer
imports the "wrong" module first; importing each module alone finds it. The science core must
also stay free of the orchestration stack, so it runs anywhere PyTorch does.

Starting ~60 interpreters that each load PyTorch and Prefect takes minutes, so one fresh
interpreter loads the third-party libraries the project imports (they cannot take part in a
cycle of ours) and then forks one child per project module: each child starts with no project
module loaded and imports just its own.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("lesa_common", "lesa_model", "tasks", "flows")
ORCHESTRATION = ("tasks", "flows", "prefect", "distributed", "dask", "s3fs", "pandera")
"""What ``lesa_model`` and ``lesa_common`` must never import."""

FORK_EACH = """
import importlib, os, sys, traceback
for name in {third_party!r}:
    try:
        importlib.import_module(name)
    except Exception:
        pass
failed = 0
for module in {modules!r}:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-3000:].encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        error = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed += 1
        print(f"--- {{module}} (status {{status}}):\\n{{error}}")
sys.exit(1 if failed else 0)
"""

SCIENCE_ALONE = """
import importlib, sys
for module in {modules!r}:
    importlib.import_module(module)
leaked = sorted(name for name in sys.modules if name.split(".")[0] in {banned!r})
assert not leaked, f"the science core imports {{leaked[:8]}}"
"""


def project_modules() -> list[str]:
    modules = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def third_party_imports() -> list[str]:
    """Top-level names the project's modules import, other than the project's own."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
    return sorted(name for name in names if name.split(".")[0] not in PACKAGES)


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_module_imports_alone_in_a_fresh_process() -> None:
    modules = project_modules()
    assert len(modules) > 40  # the walk found the packages
    done = run(FORK_EACH.format(third_party=third_party_imports(), modules=modules))
    assert done.returncode == 0, done.stdout[-10000:] + done.stderr[-3000:]


def test_no_project_import_hides_under_type_checking() -> None:
    """An import needed only for annotations is how a cycle hides; import it for real."""
    hidden = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    hidden.extend(
                        f"{path.relative_to(REPO)}:{child.lineno}"
                        for child in ast.walk(node)
                        if isinstance(child, ast.ImportFrom)
                        and (child.module or "").split(".")[0] in PACKAGES
                    )
    assert not hidden, hidden


def test_the_science_core_imports_no_orchestration() -> None:
    science = [name for name in project_modules() if name.split(".")[0] in PACKAGES[:2]]
    done = run(SCIENCE_ALONE.format(modules=science, banned=ORCHESTRATION))
    assert done.returncode == 0, done.stderr[-3000:]
