"""The layers of docs/architecture.md, read from the code: nothing imports upward.

retrieval   databases, search, remote services, and the low-level I/O every layer needs
pipelines   the stages that write databases (download, embed, index, aesthetic, neighbours, clip)
diffusion   the generator, which consumes databases through retrieval
pipelines.cli, pipelines.run, pipelines.demo, pipelines.report: the entry points that drive every layer
"""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("retrieval", "pipelines", "diffusion")
ENTRY_POINTS = {"pipelines.cli", "pipelines.run", "pipelines.demo", "pipelines.report"}
ALLOWED = {
    "retrieval": {"retrieval"},
    "pipelines": {"retrieval", "pipelines"},
    "diffusion": {"retrieval", "diffusion"},
}


def imports_of(path: str) -> set[str]:
    """Top-level packages of ours that a module imports (at module level or inside functions)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in LAYERS}


def modules():
    for layer in LAYERS:
        for name in sorted(os.listdir(os.path.join(REPO, layer))):
            if name.endswith(".py"):
                yield f"{layer}.{name[:-3]}", os.path.join(REPO, layer, name)


@pytest.mark.parametrize(
    ("module", "path"), list(modules()), ids=lambda v: v if "." in v and "/" not in v else ""
)
def test_nothing_imports_upward(module, path):
    if module in ENTRY_POINTS:
        return
    layer = module.split(".")[0]
    upward = sorted(m for m in imports_of(path) if m.split(".")[0] not in ALLOWED[layer])
    assert not upward, f"{module} ({layer}) imports {upward}; move what it needs down into retrieval/"


def test_the_checker_sees_function_level_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from pipelines.neighbours import x\n    import diffusion.train\n")
    assert imports_of(str(path)) == {"pipelines.neighbours", "diffusion.train"}
