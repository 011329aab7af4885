"""Rich views and the ``dsnb`` command line.

Example:
    >>> from dsnb.console import render, main
    >>> main(["dryrun", "train.py", "--procs", "2"])  # doctest: +SKIP
    0
"""

from dsnb.console.cli import main
from dsnb.console.view import jobs_table, render, status_view

__all__ = ["jobs_table", "main", "render", "status_view"]
