"""No function longer than a screen: one that is has more than one job to split out.

Argument parsers are the exception (``build_parser`` and friends, named ``*parser``): a long
list of ``add_argument`` calls is one job, and reads best in one place.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("lesa_common", "lesa_model", "tasks", "flows", "infra", "benchmarks", "tests")
MAX_LINES = 80


def long_functions(limit: int = MAX_LINES) -> list[str]:
    found = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                length = node.end_lineno - node.lineno + 1
                if length > limit and not node.name.endswith("parser"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} {length}")
    return found


def test_no_function_is_longer_than_a_screen() -> None:
    assert not long_functions(), long_functions()


def test_the_check_finds_a_long_function() -> None:
    assert long_functions(limit=30), "no function over 30 lines? the walk found nothing"
