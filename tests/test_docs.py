from devstack.docs import render
from devstack.procs import ROOT


def test_readme_settings_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "run `python -m devstack.docs` to regenerate the README's settings table"
