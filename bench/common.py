"""Shared pieces of the benchmarks: the demo inputs, timed processes, the machine, the ratio table."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = "demo"


def bench_arguments(doc: str, repeats: int, prefix: str, extra=None):
    """The benchmarks' shared command line (--workdir, --repeats, plus `extra(parser)`); returns the arguments and
    the workflow directory (a new temporary one unless --workdir is given). Hub access is switched off."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="workflow directory holding results/demo (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/benchmarks.md")
    if extra:
        extra(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args, args.workdir or Path(tempfile.mkdtemp(prefix=prefix))


def add_run_options(parser) -> None:
    """`--run` and `--cores` of the overhead benchmarks."""
    parser.add_argument("--run", default=RUN, help="the run whose adapter and tokens are used (default: demo)")
    parser.add_argument("--cores", type=int, default=1,
                        help="Snakemake's --cores, and the torch threads of the bare (and package) processes")


def use_threads(cores: int) -> None:
    """The torch threads of the processes this benchmark starts itself (the workflow's come from --cores)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cores)


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]


def snakemake(workdir: Path, *args: str) -> None:
    proc = subprocess.run(snakemake_command(workdir, *args), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def timed(cmd: list[str]) -> float:
    """Wall time of one command (a fresh process: imports and model loading included)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd[:4])} ...\n{proc.stderr[-3000:]}")
    return elapsed


def run_settings(run: str = RUN) -> dict:
    """A run's attribution section, as the workflow reads it from config/config.yaml."""
    from playpen_attribution.config import load_config, run_config

    return run_config(load_config(REPO / "config" / "config.yaml"), run)["attribution"]


def run_paths(workdir: Path, run: str = RUN) -> dict[str, Path]:
    results = workdir / "results" / run
    return {"adapter": results / "adapter", "train": results / "data/tokens/train",
            "query": results / "data/tokens/query"}


def machine_line() -> str:
    """The machine and the commit a table was measured on (a `+` marks uncommitted changes)."""
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, commit {commit or 'unknown'}{'+' if dirty else ''}")


BENCHMARKS_PAGE = REPO / "docs" / "benchmarks.md"


def write_docs_table(name: str, text: str, page: Path = BENCHMARKS_PAGE) -> None:
    """Replace the table between `<!-- name -->` and `<!-- /name -->` in the benchmarks page (`--docs`)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    content = page.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{page} has no {start} ... {end} markers")
    before, rest = content.split(start, 1)
    page.write_text(f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


@contextlib.contextmanager
def docs_table(name: str, enabled: bool):
    """What the block prints goes to the terminal and, with `enabled` (--docs), into docs/benchmarks.md between the
    `<!-- name -->` markers, as a code block: a rerun updates the page."""
    captured = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text):
            sys.__stdout__.write(text)
            return captured.write(text)

    with contextlib.redirect_stdout(Tee()):
        yield
    if enabled:
        write_docs_table(name, "```\n" + captured.getvalue().strip("\n") + "\n```")


def print_table(timings: dict[str, list[float]], inputs: str) -> None:
    """Medians and their ratio to the first entry (the bare library call)."""
    baseline = statistics.median(next(iter(timings.values())))
    repeats = len(next(iter(timings.values())))
    print(f"\n{machine_line()}")
    print(f"inputs: {inputs}, median of {repeats}")
    print(f"{'stage':<10} {'median s':>9} {'ratio':>7}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<10} {median:>9.1f} {median / baseline:>7.2f}")
