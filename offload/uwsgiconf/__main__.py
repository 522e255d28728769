"""``python -m offload.uwsgiconf [PROJECT_DIR]``: print the library's uWSGI options.

A project's uwsgi.ini includes them with ``ini = exec://%d.venv/bin/python -m
offload.uwsgiconf %d`` (uWSGI expands ``%d`` to the ini's directory, the
default of ``PROJECT_DIR`` being the working directory). It also creates the
var/ directory it names and its spool/ (owner-only), which uWSGI needs before
it can start.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import make_var_dir, render, var_dir


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) > 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    project_dir = Path(argv[0]) if argv else Path.cwd()
    package = Path(__file__).resolve().parent.parent
    sys.stdout.write(render(os.environ, project_dir, python=sys.executable, package=package))
    try:
        make_var_dir(var_dir(os.environ, project_dir))
    except OSError as exc:  # uWSGI's own error about the directory follows
        print(f"offload.uwsgiconf: cannot create the var/ directory: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
