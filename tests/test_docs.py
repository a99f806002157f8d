import ast
import re

from devstack.docs import render
from devstack.procs import ROOT


def test_readme_settings_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "run `python -m devstack.docs` to regenerate the README's settings table"


def cited_tests(text: str) -> list[tuple[str, str]]:
    """(file, test name) of every `tests/….py::name` in `text`; a bare `::name` after it is in the same file."""
    cited, current = [], ""
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", text):
        current = path or current
        cited.append((current, name))
    return cited


def test_security_md_cites_only_tests_that_exist():
    """SECURITY.md says which test shows each claim: a renamed or deleted test must not leave it pointing nowhere."""
    cited = cited_tests((ROOT / "SECURITY.md").read_text())
    assert len(cited) >= 20
    missing = []
    for path, name in cited:
        tree = ast.parse((ROOT / path).read_text())
        if name not in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}:
            missing.append(f"{path}::{name}")
    assert not missing, "SECURITY.md cites tests that do not exist: " + ", ".join(missing)
