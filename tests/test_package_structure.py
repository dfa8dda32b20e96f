"""The shape of ddpm_lib, read from its source: imports flow one way (no cycle, and no
import inside a function that would hide one), modules stay small, and train() reads as the
algorithm. Issue #16."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddpm_lib"
MODULES = {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}
MAX_MODULE_LINES = 410          # "about 400"
MAX_TRAIN_LINES = 80            # train()'s code, its docstring not counted


def _ddpm_lib_imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """``(node, module)`` for every import of a ddpm_lib module anywhere in ``tree``
    (module level, inside functions, under ``if``): ``from .x import y``, ``from . import x``,
    ``from ddpm_lib.x import y``, ``import ddpm_lib.x``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            package = node.level >= 1 or (node.module or "").split(".")[0] == "ddpm_lib"
            if not package:
                continue
            module = (node.module or "").removeprefix("ddpm_lib").lstrip(".")
            if module:
                found.append((node, module.split(".")[0]))
            else:                                       # from . import x, y
                found += [(node, alias.name) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.Import):
            found += [(node, alias.name.split(".")[1]) for alias in node.names
                      if alias.name.startswith("ddpm_lib.")]
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the ddpm_lib modules it imports (``__init__`` only where named)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = {target for _, target in _ddpm_lib_imports(tree)
                       if target in MODULES and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    """The checker itself: it must see a cycle, including one made by a function-local import."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    hidden = ast.parse("from .io import sha256\n\ndef f():\n    from .pretrained import x\n")
    assert [m for _, m in _ddpm_lib_imports(hidden)] == ["io", "pretrained"]


def test_imports_flow_one_way():
    graph = import_graph()
    assert graph["autoencoder"] and graph["train"]          # the graph was read at all
    cycle = find_cycle(graph)
    assert cycle is None, "ddpm_lib's imports go round: " + " -> ".join(cycle)


# the order data flows in (ddpm_lib/__init__.py and DESIGN.md say it in words)
ORDER = ["checks", "io", "data", "captions", "diffusion", "schedules", "objectives", "analytic", "likelihood", "layers", "unet", "text",
         "accel", "runs", "ema", "autoencoder", "pretrained", "hub", "train", "guidance", "samplers", "sde", "editing", "flow",
         "interop", "features", "metrics", "recipes", "viz", "__init__", "book", "bench", "cli_args", "__main__"]


def test_no_module_imports_a_later_one():
    assert sorted(ORDER) == sorted(MODULES), "a module is missing from ORDER: place it in the flow"
    later = [f"{module} imports {target}" for module, targets in import_graph().items()
             for target in targets if ORDER.index(target) > ORDER.index(module)]
    assert not later, "imports against the flow:\n" + "\n".join(later)


def test_no_function_local_import_of_ddpm_lib():
    """An import inside a function can hide a cycle from the module-level graph (the old
    autoencoder <-> pretrained one did). Optional third-party packages may still be imported
    late (matplotlib, torchvision, diffusers); ddpm_lib's own modules may not."""
    local = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local += [f"{name}.{func.name} imports {target} (line {node.lineno})"
                          for node, target in _ddpm_lib_imports(func)]
    assert not local, "\n".join(local)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"ddpm_lib/{name}.py has {lines} lines: split it by idea"


def test_train_reads_as_the_algorithm():
    tree = ast.parse(MODULES["train"].read_text())
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    has_docstring = isinstance(train.body[0], ast.Expr) and isinstance(train.body[0].value, ast.Constant)
    first = train.body[1] if has_docstring else train.body[0]
    code_lines = train.end_lineno - first.lineno + 1
    assert code_lines <= MAX_TRAIN_LINES, f"train() has {code_lines} lines of code"
    nested = [node.name for node in ast.walk(train)
              if isinstance(node, ast.FunctionDef) and node is not train]
    assert not nested, f"train() defines closures {nested}: make them named helpers"
