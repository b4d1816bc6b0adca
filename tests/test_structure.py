"""The code stays readable: the model file shows the model, files and functions stay short.

Limits from the redesign (issue 13): ``vae/model.py`` at most ~200 lines with no autograd Function
and no CPU-specific code; no file in ``vae/`` over 350 lines; no function over 60 lines in the
product packages and benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vae", "tracking", "tuning", "pipelines", "benchmarks")


def test_the_model_file_shows_the_model():
    source = (REPO / "vae" / "model.py").read_text()
    assert source.count("\n") <= 200
    tree = ast.parse(source)
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not names & {"autograd", "Function", "mkldnn", "channels_last", "vae.fast", "retained_heap"}
    layers = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Name) and node.value.id == "nn"}
    assert {"Conv2d", "ConvTranspose2d", "Linear"} <= layers  # plain torch.nn layers


def test_no_file_in_the_library_is_over_350_lines():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "vae").rglob("*.py") if (n := p.read_text().count("\n")) > 350}
    assert long == {}


def test_no_function_is_over_60_lines():
    long = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert long == []
