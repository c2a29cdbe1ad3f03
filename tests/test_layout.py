"""The tree stays easy to find one's way in: docs/architecture.md names every module, packages
import each other in one direction only, and no document points outside the repository."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CODE = ("jdit", "pallas_kernels")


def modules() -> list[Path]:
    return sorted(p.relative_to(ROOT) for top in CODE for p in (ROOT / top).rglob("*.py"))


def sections() -> dict[str, str]:
    """Text under each ``## `folder/` `` heading of architecture.md, by folder."""
    out: dict[str, str] = {}
    for block in re.split(r"^## ", ARCHITECTURE.read_text(), flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        m = re.match(r"`([\w/]+/)`", title)
        if m:
            out[m.group(1)] = body
    return out


def test_architecture_names_every_module_and_only_existing_ones():
    by_folder = sections()
    missing, stale = [], []
    for path in modules():
        folder = f"{path.parent.as_posix()}/"
        if path.name == "__init__.py":
            if folder not in by_folder:
                missing.append(f"a '## `{folder}`' section")
            continue
        if f"`{path.name}`" not in by_folder.get(folder, ""):
            missing.append(path.as_posix())
    for folder, body in by_folder.items():
        if not (ROOT / folder).is_dir():
            stale.append(folder)
        for name in re.findall(r"^- `([\w]+\.py)`", body, flags=re.M):
            if not (ROOT / folder / name).exists():
                stale.append(folder + name)
    assert not missing, f"docs/architecture.md does not describe {missing}"
    assert not stale, f"docs/architecture.md describes modules that do not exist: {stale}"


def _package(module: str) -> str:
    """``jdit.nn.attention`` -> ``jdit.nn``; top-level modules (``jdit.cli``) stand alone."""
    parts = module.split(".")
    if parts[0] == "pallas_kernels":
        return "pallas_kernels"
    return ".".join(parts[:2])


def import_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the importing modules (every import statement, those
    inside functions included; ``import jdit`` alone names no package)."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in modules():
        name = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
        if name == "jdit":
            continue  # the package root only re-exports its subpackages
        here = _package(name)
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = ([f"{node.module}.{a.name}" for a in node.names]
                           if node.module == "jdit" else [node.module])
            else:
                continue
            for target in targets:
                if target.split(".")[0] in CODE and target != "jdit":
                    there = _package(target)
                    if there != here:
                        graph[here][there].add(name)
    return graph


def test_no_package_imports_a_package_that_imports_it_back():
    graph = import_graph()
    cycles = []
    for a, targets in graph.items():
        for b in targets:
            # b reaches a again (directly or through others)?
            seen, todo = set(), [b]
            while todo:
                node = todo.pop()
                if node == a:
                    cycles.append((a, b, sorted(graph[a][b])))
                    break
                if node not in seen:
                    seen.add(node)
                    todo.extend(graph.get(node, ()))
    assert not cycles, "import cycles between packages: " + "; ".join(
        f"{a} -> {b} (in {mods}) and back" for a, b, mods in cycles)


def test_the_parallel_service_knows_nothing_of_training_or_aot():
    graph = import_graph()
    assert set(graph["jdit.parallel"]) <= {"jdit.nn"}, dict(graph["jdit.parallel"])
    users = {pkg for pkg, targets in graph.items() if "jdit.aot" in targets}
    assert users <= {"jdit.cli", "jdit.benchmarks"}, users  # tools on top of the library


@pytest.mark.parametrize("doc", sorted(
    [p.relative_to(ROOT) for p in (ROOT / "docs").glob("*.md")]
    + [Path(n) for n in ("README.md", "CONTRIBUTING.md", "BENCHMARKS.md")]
    + [p.relative_to(ROOT) for p in (ROOT / "notebooks").glob("*.ipynb")]), ids=str)
def test_documents_refer_only_to_files_in_the_repository(doc):
    text = (ROOT / doc).read_text()
    outside = re.findall(r"(?<![\w/.])\.\./[\w./-]+", text)
    assert not outside, f"{doc} refers to files outside the repository: {outside}"


def test_reliability_guarantees_name_tests_that_exist():
    """docs/reliability.md proves each guarantee by naming tests: they must exist."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    files = set(re.findall(r"(tests/[\w/]+\.py)", text))
    assert files and all((ROOT / f).is_file() for f in files), files
    defined = {m for f in (ROOT / "tests").rglob("*.py")
               for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    named = set(re.findall(r"::(test_\w+)", text))
    assert named and named <= defined, sorted(named - defined)
