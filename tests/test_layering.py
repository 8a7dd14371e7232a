"""The layering rule: Prefect and Ray are imported in flows/ only; storage/ imports no torch either."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"storage": {"prefect", "ray", "torch", "pixart", "captioning", "flows"},
             "captioning": {"prefect", "ray", "pixart", "flows"},
             "pixart": {"prefect", "ray", "captioning", "flows"}}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_packages_do_not_import_orchestration(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    offenders = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & FORBIDDEN[package]) for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_unsafe_loading_is_absent_from_source():
    bad = ("allow_pickle=True", "pickle.load", ".extractall(", "weights_only=False")
    hits = [f"{p.relative_to(ROOT)}: {b}" for pkg in ("storage", "captioning", "pixart", "flows")
            for p in (ROOT / pkg).rglob("*.py") for b in bad if b in p.read_text()]
    assert hits == []
