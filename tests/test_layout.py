"""The house's rules, read off the source (README "Layout"): stages on top, decoders over the adapter
protocol, models at the bottom; no import circles; no file over 400 lines."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "models", "data", "decode", "eval", "train", "bench", "launch")


def sources():
    for pkg in PACKAGES + ("tests",):
        yield from sorted((REPO / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in sources() if not module_name(p).startswith("tests")}
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in g[m]:
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("lower, upper", [
    ("core", "models"), ("core", "data"), ("core", "decode"), ("core", "eval"), ("core", "train"),
    ("models", "decode"), ("models", "eval"), ("models", "train"),
    ("decode", "eval"), ("eval", "decode"), ("decode", "train"), ("eval", "train"), ("decode", "bench"),
])
def test_layers_only_import_downwards(lower, upper):
    bad = [(m, i) for m, deps in graph().items() if m.split(".")[0] == lower
           for i in deps if i.split(".")[0] == upper]
    assert not bad, f"{lower}/ must not import {upper}/: {bad}"


def test_decoders_are_siblings_over_the_window_module():
    g = graph()
    decoders = {"decode.ar", "decode.sjd", "decode.sjd2"}
    assert not [(m, i) for m in decoders for i in g[m] if i in decoders]


MAX_LINES = 400


def test_no_file_over_the_line_limit():
    long = {str(p.relative_to(REPO)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


CONCRETE_MODELS = ("models.tiny", "models.shapes_vq", "models.lumina_mgpt", "models.emu3", "models.janus", "models.chameleon_vqgan",
                   "models.hf_common")


def test_train_reaches_models_only_through_the_registry_and_the_protocol():
    bad = [(m, i) for m, deps in graph().items() if m.split(".")[0] == "train"
           for i in deps if i.startswith(CONCRETE_MODELS)]
    assert not bad, f"train/ must not import a concrete model module (use models.load_adapter): {bad}"
