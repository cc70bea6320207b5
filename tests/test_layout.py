"""Readability rules of the package that a reviewer would otherwise check by hand."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxlm"
MAX_FUNCTION_LINES = 80


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_checkpointing_knows_no_backend_and_the_train_step_no_test_hook():
    assert "pmap" not in (PACKAGE / "checkpoint.py").read_text(encoding="utf-8")
    step = (PACKAGE / "step.py").read_text(encoding="utf-8")
    assert "poison" not in step and "inject_nan" not in step


def test_no_module_asks_for_the_evaluation_module_to_open_checkpoints():
    for name in ("generate.py", "export.py"):
        text = (PACKAGE / name).read_text(encoding="utf-8")
        assert "from jaxlm.evaluate import" not in text, name
