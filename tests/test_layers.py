"""The dependency rule, read from the source: cli.app -> commands -> {cli.*, core, formats};
core -> formats; formats -> nothing of vecpipe; no circles. Lazy imports inside functions count:
they are arrows too, only later."""
import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "commands", "core", "formats")
ALLOWED = {  # package -> the vecpipe packages its modules may import
    "formats": {"formats"},
    "core": {"core", "formats"},
    "cli": {"cli", "core", "formats"},  # cli.app also imports commands (the registry)
    "commands": {"cli", "core", "formats"},
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


@functools.cache
def modules() -> dict[str, Path]:
    return {f"vecpipe.{package}.{path.stem}": path
            for package in PACKAGES for path in sorted((REPO / package).glob("*.py"))}


def imported(module: str, path: Path) -> set[str]:
    """The vecpipe modules `module` imports (`from vecpipe.core import codec` names
    vecpipe.core.codec; a package import names its __init__)."""
    package = module.rsplit(".", 1)[0]
    found = set()
    known = modules()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if not base.startswith("vecpipe"):
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in known else f"{base}.__init__"
                          if f"{base}.__init__" in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("vecpipe"))
    found.discard(module)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    return {module: imported(module, path) for module, path in modules().items()}


def test_every_arrow_goes_down():
    wrong = []
    for module, targets in graph().items():
        package = module.split(".")[1]
        for target in targets:
            target_package = target.split(".")[1]
            if module == "vecpipe.cli.app" and target_package == "commands":
                continue
            if target_package not in ALLOWED[package]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layer rule:\n" + "\n".join(sorted(wrong))


def test_no_circles():
    edges = graph()
    cycles = []

    def visit(node, trail):
        for target in sorted(edges.get(node, ())):
            if target in trail:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in done:
                visit(target, trail + [target])
        done.add(node)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(sorted(set(cycles)))


def test_core_never_imports_the_shell():
    for module, path in modules().items():
        if module.startswith(("vecpipe.core.", "vecpipe.formats.")):
            tree = ast.parse(path.read_text())
            names = {alias.name.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, (ast.Import, ast.ImportFrom))
                     for alias in node.names} | {
                (node.module or "").split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)}
            assert not names & {"typer", "click", "rich"}, module


def test_the_library_does_not_word_errors_as_cli_flags():
    """The command adds the flag hint; core speaks of the concept. (formats/ holds the one
    parser of a few option values, such as the --shard spec, and may name them.)"""
    found = []
    for path in sorted((REPO / "core").glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings and FLAG.search(node.value):
                found.append(f"{path.name}:{node.lineno}: {FLAG.search(node.value).group()}")
    assert not found, "flags named in library strings:\n" + "\n".join(found)
