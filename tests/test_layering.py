"""Source checks that need no imports: the layering rule (Prefect and Ray are imported in flows/ only; storage/
imports no torch either), no unsafe loading, and docstrings and docs that match the code (every module and package
opens with a docstring; every module path, `pkg.module.name` and file path they name exists)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("storage", "captioning", "pixart", "flows")
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


# The one exception, named: storage/devices.py turns "auto" into a torch device and dtype, importing torch inside
# those two functions only, so that captioning and pixart share one definition; importing it loads no torch
# (tests/test_devices.py checks that in a fresh interpreter).
ALLOWED = {"storage/devices.py": {"torch"}}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_packages_do_not_import_orchestration(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    offenders = {rel: sorted(imported_modules(f) & FORBIDDEN[package] - ALLOWED.get(rel, set()))
                 for f in files if (rel := str(f.relative_to(ROOT)))}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_allowed_exception_imports_torch_inside_functions_only():
    tree = ast.parse((ROOT / "storage" / "devices.py").read_text())
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in top


def test_unsafe_loading_is_absent_from_source():
    bad = ("allow_pickle=True", "pickle.load", ".extractall(", "weights_only=False")
    hits = [f"{p.relative_to(ROOT)}: {b}" for pkg in PACKAGES
            for p in (ROOT / pkg).rglob("*.py") for b in bad if b in p.read_text()]
    assert hits == []


# -- Docstrings and docs match the code -------------------------------------------------------------------------------

TOP_DIRS = (*PACKAGES, "tests", "benchmarks", "configs", "docker")
DOCS = ("README.md", "ARCHITECTURE.md", "FIDELITY.md", "benchmarks/GPU.md")
BACKTICKED = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.\w+)+$")  # storage.shard, pixart.data.finish.pad_text
FILE_PATH = re.compile(r"^[\w./-]+(?:\.py|\.md|\.yaml|/)$")  # storage/layout.py, shard.py, configs/train/


def all_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def top_level_names(module: Path) -> set[str]:
    """What `module.NAME` can refer to: its functions, classes, assignments and imports."""
    names = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def dotted_exists(ref: str) -> bool:
    """`pkg.sub.module` is a module or package; `pkg.module.name` also names something defined in the module."""
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.exists():
            return i == len(parts) or parts[i] in top_level_names(module)
    return False


def path_exists(ref: str, here: Path) -> bool:
    """A path from the repository root, or a file beside the text naming it (or anywhere in the packages)."""
    if ref.split("/")[0] in TOP_DIRS:
        return (ROOT / ref).exists()
    if "/" in ref:
        return True  # under an output root (`transformer/`) or in another repository (FIDELITY.md's official code)
    return (here / ref).exists() or any(p.name == ref for p in all_modules())


def stale_references(text: str, here: Path) -> list[str]:
    stale = []
    for ref in (r.strip() for r in BACKTICKED.findall(text)):
        if any(c in ref for c in "<>*{} ="):
            continue  # a pattern or a command, not a name
        if DOTTED.match(ref) and not dotted_exists(ref):
            stale.append(ref)
        elif FILE_PATH.match(ref) and ("/" in ref or ref.endswith(".py")) and not path_exists(ref, here):
            stale.append(ref)
    return stale


def test_every_module_and_package_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in all_modules() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == [], "every module opens with a docstring saying what it is (ARCHITECTURE.md, rule 1)"
    packages = {p.parent for p in all_modules()}
    assert [str(d.relative_to(ROOT)) for d in packages if not (d / "__init__.py").exists()] == []


def test_docstrings_name_only_modules_and_files_that_exist():
    stale = {str(p.relative_to(ROOT)): refs for p in all_modules()
             if (refs := stale_references(ast.get_docstring(ast.parse(p.read_text())) or "", p.parent))}
    assert stale == {}


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_only_modules_and_files_that_exist(doc):
    assert stale_references((ROOT / doc).read_text(), (ROOT / doc).parent) == []


def test_every_package_docstring_lists_its_modules_and_subpackages():
    """A newcomer opens a package's __init__ and finds every module in it named (`name`, `name.py` or `name/`)."""
    unlisted = {}
    for init in sorted(p for p in all_modules() if p.name == "__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Filled in" not in doc, init
        names = [p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"]
        names += [d.name for d in init.parent.iterdir() if (d / "__init__.py").exists()]
        missing = sorted(n for n in names if not any(f in doc for f in (f"`{n}`", f"`{n}.py`", f"`{n}/`")))
        if missing:
            unlisted[str(init.relative_to(ROOT))] = missing
    assert unlisted == {}


def test_the_captioner_docstring_names_what_it_does():
    captioner = ROOT / "captioning" / "captioner.py"
    doc = next(ast.get_docstring(n) for n in ast.parse(captioner.read_text()).body
               if isinstance(n, ast.ClassDef) and n.name == "Captioner")
    assert "prepare_image" not in doc and "prep" in doc


def test_the_heavy_tests_named_in_conftest_exist():
    """tests/conftest.py marks these `slow` by name: a renamed test would silently join the fast loop."""
    from tests.conftest import HEAVY

    def names(path: Path) -> set[str]:  # test functions, and tests reused under another name (test_x = other.test_y)
        body = ast.parse(path.read_text()).body
        return ({n.name for n in body if isinstance(n, ast.FunctionDef)}
                | {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)})

    missing = [e for e in sorted(HEAVY) if not (ROOT / "tests" / e.split("::")[0]).exists()
               or ("::" in e and e.split("::")[1] not in names(ROOT / "tests" / e.split("::")[0]))]
    assert missing == []
