"""What `azd deploy` uploads: the app and nothing else, whatever else lies in the folder.

`make package` (devstack/package.py) builds the zip as azd does; these tests check what it holds,
both for this checkout (with its .venv, node_modules, tool venvs and caches) and for a folder
seeded with everything a developer or `azd restore` leaves beside the app.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from devstack.package import PackageError, build_package, package_files
from devstack.package import main as package_main

ROOT = Path(__file__).resolve().parent.parent
APP_FILES = ("function_app.py", "host.json", "requirements.txt")
MAX_PACKAGE_BYTES = 400_000  # today about 85 kB; a vendored dependency or data file would blow past it


def app_files(project: Path) -> set[str]:
    """What must ship: the entry point, host.json, requirements.txt and every file of relay/ (code and static)."""
    relay = {p.relative_to(project).as_posix() for p in (project / "relay").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    return {*APP_FILES, *relay}


def seed(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the app beside what must not ship: every kind of virtual environment, local settings,
    azd's environment, tests, tools, caches and a previous package."""
    folder = tmp_path / "relayproj"
    folder.mkdir()
    for name in (*APP_FILES, ".funcignore"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / "relay", folder / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    seed(folder, {
        ".venv/pyvenv.cfg": "home = /usr/bin",
        "venv/pyvenv.cfg": "home = /usr/bin",
        "venv/lib/python3.11/site-packages/requests/__init__.py": "",
        "relayproj_env/pyvenv.cfg": "home = /usr/bin",  # what `azd restore` creates: <folder>_env
        ".python_packages/lib/site-packages/azure/__init__.py": "",
        "local.settings.json": '{"Values": {"DIRECTLINE_SECRET": "s3cret"}}',
        ".azure/prod/.env": "DIRECTLINE_SECRET=s3cret",
        "relay/__pycache__/settings.cpython-311.pyc": "",
        "tests/test_x.py": "", "devstack/host.py": "", "benchmarks/__init__.py": "", "infra/main.bicep": "",
        "node_modules/botframework-webchat/dist/webchat.js": "", "dist/relay.zip": "",
        ".pytest_cache/v/cache": "", ".azurite/__azurite_db_table__.json": "", ".git/HEAD": "",
        "README.md": "", "requirements-dev.txt": "", "Makefile": "",
    })
    return folder


def test_the_package_holds_the_app_and_none_of_what_lies_beside_it(project, tmp_path):
    files = build_package(project, tmp_path / "out" / "relay.zip")
    assert set(files) == app_files(project)
    with zipfile.ZipFile(tmp_path / "out" / "relay.zip") as archive:
        assert sorted(archive.namelist()) == files
        assert archive.read("relay/static/demo.html") == (project / "relay/static/demo.html").read_bytes()


def test_this_checkout_packages_to_the_app_alone_and_stays_small(tmp_path):
    output = tmp_path / "relay.zip"
    assert package_main(["--project", str(ROOT), "--output", str(output)]) == 0
    with zipfile.ZipFile(output) as archive:
        names = set(archive.namelist())
    assert names == app_files(ROOT)
    assert {"relay/static/relay-webchat.js", "relay/static/demo.html"} <= names
    assert output.stat().st_size < MAX_PACKAGE_BYTES


def test_a_virtual_environment_the_ignore_file_does_not_name_is_refused(project):
    seed(project, {"pyenv-3.11/pyvenv.cfg": "home = /usr/bin", "pyenv-3.11/lib/site-packages/x.py": ""})
    with pytest.raises(PackageError, match=r"virtual environment in pyenv-3\.11: add its folder to \.funcignore"):
        package_files(project)


def test_without_its_venv_lines_the_ignore_file_would_ship_them(project):
    """The lines that keep virtual environments out are needed: azd adds no exclusions of its own."""
    ignore = project / ".funcignore"
    ignore.write_text("\n".join(line for line in ignore.read_text().splitlines()
                                if line not in ("venv/", "*_env/", ".python_packages/")))
    with pytest.raises(PackageError) as refused:
        package_files(project)
    assert "in .python_packages, relayproj_env, venv:" in str(refused.value)
    ignore.write_text(ignore.read_text() + "\nvenv/\n*_env/\n.python_packages/\n")
    assert set(package_files(project)) == app_files(project)
