"""The shape of the package: a core that never imports the serving shell or the tools, methods
that speak no HTTP, and a README map that names files that exist."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from handlers.tools.sources import PACKAGE, ROOT

CORE = [p for p in PACKAGE.rglob("*.py") if not {"serving", "tools"} & set(p.relative_to(PACKAGE).parts)]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports (relative imports resolved against the package)."""
    package = ".".join(("handlers", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_core_never_imports_the_serving_shell_or_the_tools():
    assert len(CORE) >= 10
    for path in CORE:
        bad = {n for n in imported_modules(path) if n.startswith(("handlers.serving", "handlers.tools"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


ENGINES = ("torchserve", "kserve")


def test_each_engine_imports_the_common_part_and_never_the_other():
    """serving/ is a common part (service, admission, protocol, settings, metrics, ...) and one
    folder per engine: the common part imports no engine, an engine never the other."""
    serving = PACKAGE / "serving"
    folders = {path: path.relative_to(serving).parts[0] for path in serving.rglob("*.py")}
    assert set(ENGINES) <= set(folders.values())
    for path, folder in folders.items():
        own = folder if folder in ENGINES else None
        names = imported_modules(path)
        for engine in ENGINES:
            if engine != own:
                bad = {n for n in names if n.startswith(f"handlers.serving.{engine}")}
                assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_methods_speak_no_http():
    for path in (PACKAGE / "attribution").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\b(4\d\d|5\d\d)\b|status", text), path.name
        assert "RequestError" not in text, path.name


def test_the_readme_map_names_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Map of the code", 1)[1].split("```", 2)[1]
    folders: list[str] = []
    for line in block.splitlines():
        entry = line.split("  ", 1)[0] if not line.startswith(" ") else None
        indent = len(line) - len(line.lstrip())
        names = line.strip().split("   ")[0].split()
        if not names or not re.fullmatch(r"[\w./-]+", names[0]):
            continue
        folders = folders[: indent // 2]
        for name in names:
            if not re.fullmatch(r"[\w-]+(\.\w+|/)", name):
                break
            path = ROOT.joinpath(*folders, name)
            assert path.exists(), f"README map: {path.relative_to(ROOT)} does not exist"
        if names[0].endswith("/") and entry is None or names[0].endswith("/"):
            folders.append(names[0].rstrip("/"))


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


#: folder -> (prefixes it must not import, prefixes allowed among those). Tests import the package
#: and tests/support, never scripts/ or another test module; scripts/ run from the checkout on the
#: installed package (a benchmark may reuse another benchmark's timing, scripts.bench).
IMPORT_RULES = {
    "tests": (("scripts", "tests."), ("tests.support",)),
    "scripts": (("tests", "scripts"), ("scripts.bench",)),
}


@pytest.mark.parametrize("folder", sorted(IMPORT_RULES))
def test_tests_and_scripts_import_what_they_may(folder):
    refused, allowed = IMPORT_RULES[folder]
    for path in python_files(folder):
        for name in imported_modules_of_file(path):
            assert not name.startswith(refused) or name.startswith(allowed), f"{path.relative_to(ROOT)} imports {name}"


def test_nothing_reads_outside_the_checkout():
    """The evaluation pairs are data/sts_pairs.tsv: no file points at a folder beside the checkout."""
    outside = re.compile(r"\.\./shared|parent\s*/\s*\"shared\"|/work/shared")
    for folder in ("handlers", "scripts", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".md", ".yaml", ".yml", ".toml") and path != Path(__file__):
                assert not outside.search(path.read_text(errors="replace")), path.relative_to(ROOT)
    assert (ROOT / "data" / "sts_pairs.tsv").is_file() and (ROOT / "data" / "README.md").is_file()


def imported_modules_of_file(path: Path) -> set[str]:
    """Absolute names of what a file outside the package imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names
