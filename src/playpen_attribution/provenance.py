"""Hashes and versions that record where an artifact came from."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

LIBRARIES = ["torch", "transformers", "peft", "trl", "datasets", "tokenizers", "accelerate",
             "bergson", "kronfluence", "snakemake", "pandas", "playpen-attribution"]


def tree_hash(path: str | Path) -> str:
    """sha256 over the relative names and bytes of every file under `path` (or of one file)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        # bytecode, and the cache files `datasets` may have left in a saved dataset (derived from it, not its content)
        if "__pycache__" in file.parts or (file.name.startswith("cache-") and file.suffix == ".arrow"):
            continue
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


_PACKAGE_IMPORT = re.compile(r"playpen_attribution\.(\w+)")


def module_closure(modules) -> set[str]:
    """The named package modules and every package module they import, directly or not (read from the source)."""
    seen: set[str] = set()
    stack = list(modules)
    while stack:
        module = stack.pop()
        path = PACKAGE_DIR / f"{module}.py"
        if module in seen or not path.is_file():
            continue
        seen.add(module)
        stack += _PACKAGE_IMPORT.findall(path.read_text())
    return seen


def code_hash(*modules: str) -> str:
    """Hash of the named package modules (e.g. "data", "tokenization") and of all they import, for Snakemake
    `params:`.

    Snakemake reruns a rule when its params change, but it does not track the modules a script
    imports; putting this hash in `params:` makes a change to the stage's code rerun the stage.
    """
    digest = hashlib.sha256()
    for module in sorted(module_closure(modules)):
        digest.update(module.encode())
        digest.update((PACKAGE_DIR / f"{module}.py").read_bytes())
    return digest.hexdigest()[:16]


def script_modules(script: str | Path) -> list[str]:
    """The package modules a rule script imports (read from its source)."""
    return sorted(set(_PACKAGE_IMPORT.findall(Path(script).read_text())))


def script_code_hash(script: str | Path) -> str:
    """`code_hash` of every package module a rule script imports and all they import: derived from the script, so
    a rule's list of modules cannot fall behind its code."""
    return code_hash(*script_modules(script))


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
