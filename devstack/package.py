"""`make package`: the zip `azd deploy` uploads, built the way azd builds it, so a test can see what ships.

    python -m devstack.package [--project .] [--output dist/relay.zip]

azd (Azure/azure-dev, cli/azd/pkg/project/project_utils.go, `createDeployableZip`) walks the
service's folder and leaves out the `.azure` folder, the ignore file itself, `local.settings.json`
(function apps), and every path `.funcignore` matches in gitignore syntax. A `.funcignore`
*replaces* azd's own Python exclusions (any folder holding `pyvenv.cfg`, and `__pycache__`), so it
must name every virtual environment itself: `.venv/`, `venv/`, the `<folder>_env/` that `azd
restore` creates, `.python_packages/`. This builder refuses a package that would carry one.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import pathspec

IGNORE_FILE = ".funcignore"
ALWAYS_LEFT_OUT = {".azure"}  # folders azd never packages
FUNCTION_APP_LEFT_OUT = {"local.settings.json", IGNORE_FILE}  # files azd never packages for a function app


class PackageError(RuntimeError):
    """The package would ship something it must not (a virtual environment)."""


def package_files(project: Path) -> list[str]:
    """The project-relative paths (POSIX) azd would put in the zip, sorted."""
    ignore_path = project / IGNORE_FILE
    lines = ignore_path.read_text(encoding="utf-8-sig").splitlines() if ignore_path.exists() else []
    ignored = pathspec.GitIgnoreSpec.from_lines(lines)
    files = []
    for folder, dirs, names in os.walk(project, followlinks=True):  # azd follows links too
        base = Path(folder).relative_to(project)
        dirs[:] = sorted(d for d in dirs if d not in ALWAYS_LEFT_OUT
                         and not ignored.match_file((base / d).as_posix() + "/"))
        for name in names:
            path = (base / name).as_posix()
            if name not in FUNCTION_APP_LEFT_OUT and not ignored.match_file(path):
                files.append(path)
    carried = sorted({folder for folder in map(_environment_folder, files) if folder})
    if carried:
        raise PackageError(f"the package would carry a virtual environment in {', '.join(carried)}: "
                           f"add its folder to {IGNORE_FILE} (it replaces azd's own Python exclusions)")
    return sorted(files)


def _environment_folder(path: str) -> str:
    """The virtual environment (or Core Tools' .python_packages) a packaged file belongs to, or ""."""
    parts = path.split("/")
    if parts[-1] == "pyvenv.cfg":
        return "/".join(parts[:-1]) or "."
    if "site-packages" in parts:
        head = parts[:parts.index("site-packages")]
        if head[-2:-1] == ["lib"]:
            head = head[:-2]  # <env>/lib/pythonX.Y/site-packages
        elif head[-1:] == ["lib"]:
            head = head[:-1]  # <env>/lib/site-packages
        return "/".join(head) or "."
    return ""


def build_package(project: Path, output: Path) -> list[str]:
    """Write the zip of `package_files(project)` to `output`; returns what it holds."""
    files = package_files(project)
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in files:
            archive.write(project / name, name)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--output", type=Path, default=Path("dist/relay.zip"))
    args = parser.parse_args(argv)
    try:
        files = build_package(args.project.resolve(), args.output)
    except PackageError as error:
        print(f"package: {error}", file=sys.stderr)
        return 1
    print(f"{args.output}: {len(files)} files, {args.output.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
