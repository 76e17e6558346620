"""The documentation: a short README, links that resolve, a configuration reference that cannot drift from the
schema and the rules, and the quick commands the pages give."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, snakemake

PAGES = [REPO / "README.md", REPO / "config" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a `# comment` in a code block is no heading
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_is_short_and_points_to_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"https?://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, broken


def test_link_check_can_fail(tmp_path):
    """The check above finds a missing file and a missing heading (checked on a page made to hold both)."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](nowhere.md) [no heading](#nope)\n")
    text = page.read_text()
    targets = LINK.findall(text)
    assert targets == ["#title", "nowhere.md", "#nope"]
    assert "title" in anchors(page) and "nope" not in anchors(page) and not (tmp_path / "nowhere.md").exists()


def test_configuration_reference_is_generated_from_the_schema_and_current():
    from playpen_attribution.config_reference import PAGE, main, page_with_reference, render, schema_keys

    assert main(["--check"]) == 0, "run: uv run python -m playpen_attribution.config_reference --write"
    page = PAGE.read_text()
    for row in schema_keys():
        assert (f"| `{row['key']}` |" if "." in row["key"] else f"### `{row['key']}`") in page, row["key"]
    # a key added to the schema (or a description changed) makes the committed page out of date
    from playpen_attribution.config import SCHEMA_PATH

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    schema["$defs"]["report"]["properties"]["new_key"] = {"type": "integer", "default": 1, "description": "new"}
    assert page_with_reference(page, render(schema)) != page
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    schema["$defs"]["lora"]["properties"]["r"]["default"] = 99
    assert page_with_reference(page, render(schema)) != page


def test_the_reference_names_each_keys_readers():
    """The last column against the readers the workflow tests check by dry run (tests/test_workflow.py)."""
    from playpen_attribution.config_reference import key_readers, rules_reading

    readers = key_readers()
    assert rules_reading("training.logging_steps", readers) == ["lds_retrain", "memory_plan", "removal_retrain",
                                                                "train_adapter", "train_ensemble_member",
                                                                "train_scoring_adapter"]
    # the report reads the scored adapters' epochs, not the training section whole
    assert rules_reading("training.epochs", readers) == ["lds_retrain", "memory_plan", "removal_retrain", "report",
                                                         "train_adapter", "train_ensemble_member",
                                                         "train_scoring_adapter"]
    # the memory plan reads the attribution section whole; a `use rule` without params of its own (bergson_adam_mix)
    # reads its parent's
    assert rules_reading("attribution.bergson.mix_downweight_components", readers) == [
        "bergson_adam_mix", "bergson_mix", "memory_plan"]
    assert rules_reading("attribution.kronfluence.covariance_batch_size", readers) == ["fit_factors", "memory_plan"]
    assert rules_reading("validation.planted.seed", readers) == ["planted_audit", "planted_copies"]
    assert rules_reading("report.top_k", readers) == ["report"]
    assert rules_reading("validation.removal.seed", readers) == ["removal", "removal_rows"]
    assert rules_reading("resources.train_mem_mb", readers) == []  # a resource, never a param


@pytest.mark.parametrize("tool", ["fit-hessians", "run-query"])
def test_the_seed_tools_help_lists_their_flags(tool):
    exe = Path(sys.executable).parent / tool
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    documented = (REPO / "docs" / "seed-tools.md").read_text()
    flags = set(re.findall(r"(--[a-z][a-z-]+)", out)) - {"--help"}
    assert flags and all(flag in documented for flag in flags), sorted(f for f in flags if f not in documented)


@pytest.mark.slow
def test_the_dry_runs_the_pages_give_run(tmp_path):
    commands = set()
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("uv run snakemake -n "):
                    commands.add(line.removeprefix("uv run snakemake "))
    assert len(commands) >= 2, commands
    for command in sorted(commands):
        proc = snakemake(tmp_path, *command.split())
        assert "Memory plan of run" in proc.stderr + proc.stdout, command


def test_every_bench_table_has_its_markers_and_a_rerun_rewrites_only_between_them(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from common import docs_table, write_docs_table

    page = (REPO / "docs" / "benchmarks.md").read_text()
    literal = set()
    for script in (REPO / "bench").glob("*.py"):
        literal |= set(re.findall(r'docs_table\("([\w-]+)"', script.read_text()))
        literal |= set(re.findall(r'write_docs_table\("([\w-]+)"', script.read_text()))
    runs = {"kronfluence-overhead-demo", "kronfluence-overhead-rehearsal", "bergson-overhead-demo-2-shards",
            "bergson-overhead-rehearsal-1-shards", "bergson-overhead-rehearsal-2-shards", "rehearsal-table",
            "smol-table", "replicate-agreement-smol"}  # names made from --run / --shards
    assert {"gradient-passes", "lds-overhead", "table-scale", "plan-at-length-table"} <= literal
    for name in literal | runs:
        assert f"<!-- {name} -->" in page and f"<!-- /{name} -->" in page, name
    target = tmp_path / "page.md"
    target.write_text("before\n<!-- t -->\nold\n<!-- /t -->\nafter\n")
    write_docs_table("t", "new table", target)
    assert target.read_text() == "before\n<!-- t -->\nnew table\n<!-- /t -->\nafter\n"
    with docs_table("t", enabled=False):
        print("printed only")
    assert "printed only" not in target.read_text()


BENCH_SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_every_bench_script_parses_its_command_line(script):
    """docs/benchmarks.md gives each script's command: its options at least parse (a flag defined twice, by the
    script and by bench/common.py, once broke `rehearsal.py` before it ran anything)."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
