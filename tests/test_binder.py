"""The Binder configuration installs what the tutorial notebooks import."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import pytest
import tomllib
from helpers import REPO

nbformat = pytest.importorskip("nbformat")

BINDER = REPO / "binder"


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


#: What a tutorial needs installed when it makes a Cluster on a backend (the backend's extra).
BACKEND_PACKAGES = {"statefulset": "kubernetes", "mpijob": "kubernetes", "trainjob": "kubernetes", "ray": "ray"}


def notebook_imports() -> set[str]:
    """Top-level modules imported by any code cell of any tutorial, and those its backends import."""
    modules = set()
    for path in (REPO / "notebooks").glob("*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules.add(node.module.split(".")[0])
                elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Cluster" and node.args
                      and isinstance(node.args[0], ast.Constant) and node.args[0].value in BACKEND_PACKAGES):
                    modules.add(BACKEND_PACKAGES[node.args[0].value])
    return modules


def binder_installs() -> set[str]:
    """Distribution names that repo2docker installs from binder/: requirements, postBuild, dsnb's extras."""
    names = {_dist_name(line) for line in (BINDER / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith(("#", "-"))}
    post_build = (BINDER / "postBuild").read_text()
    names.update(_dist_name(m) for m in re.findall(r"pip install [^\n]*?\b([a-z][a-z0-9_-]*==[0-9.]+)", post_build))
    extras = re.search(r'pip install [^\n]*-e "\.\[([a-z0-9,]+)\]"', post_build)
    assert extras, "postBuild must install dsnb itself with its extras"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names.add(project["name"])
    names.update(_dist_name(r) for r in project["dependencies"])
    for extra in extras.group(1).split(","):
        names.update(_dist_name(r) for r in project["optional-dependencies"][extra])
    return names


def test_every_notebook_import_is_installed_by_binder() -> None:
    providers = importlib.metadata.packages_distributions()
    installed = binder_installs()
    imports = notebook_imports() - set(sys.stdlib_module_names)
    assert "dsnb" in imports
    missing = {m: providers.get(m, [m]) for m in imports
               if not any(_dist_name(d) in installed for d in providers.get(m, [m]))}
    assert not missing, f"notebooks import packages binder/ does not install: {missing}"


def test_binder_and_make_pin_the_same_torch_and_deepspeed() -> None:
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"TORCH \?= torch==([0-9.]+)", makefile).group(1)
    deepspeed = re.search(r"DEEPSPEED \?= deepspeed==([0-9.]+)", makefile).group(1)
    assert f"torch=={torch}+cpu" in (BINDER / "requirements.txt").read_text()
    assert f"deepspeed=={deepspeed}" in (BINDER / "postBuild").read_text()


def test_dsnb_widgets_need_only_the_notebook_extra() -> None:
    """What dsnb's notebook views import must come with the `notebook` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_dist_name(r) for r in project["dependencies"] + project["optional-dependencies"]["notebook"]}
    providers = importlib.metadata.packages_distributions()
    used = set()
    for path in (REPO / "dsnb" / "widgets").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                used.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                used.add(node.module.split(".")[0])
    third_party = used - set(sys.stdlib_module_names) - {"dsnb"}
    undeclared = {m for m in third_party if not any(_dist_name(d) in declared for d in providers.get(m, [m]))}
    assert not undeclared, f"dsnb/widgets imports packages the notebook extra lacks: {undeclared}"
