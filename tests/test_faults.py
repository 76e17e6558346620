"""Faults: a truncated or corrupt artifact is named with the fix; Snakemake's locks after a kill; a job that dies
mid-write leaves nothing that looks complete. (The demo killed mid-job and mid-merge, then finished by the same
command: tests/test_workflow.py, which runs after the demo DAG.)

How each test was checked to fail without its protection: noted beside it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from playpen_attribution.artifacts import check_artifact, diagnose_inputs


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_artifacts_of_every_kind_are_named(tmp_path):
    import datasets
    import torch
    from safetensors.torch import save_file

    made = {}
    made["table.parquet"] = tmp_path / "table.parquet"
    pd.DataFrame({"a": range(1000), "b": ["x" * 20] * 1000}).to_parquet(made["table.parquet"])
    made["adapter_model.safetensors"] = tmp_path / "adapter_model.safetensors"  # an adapter, factors, a model
    save_file({"w": torch.randn(64, 64), "v": torch.randn(32)}, str(made["adapter_model.safetensors"]))
    made["shard-0.npz"] = tmp_path / "shard-0.npz"  # a score shard
    np.savez(made["shard-0.npz"], scores=np.random.default_rng(0).normal(size=(20, 50)), train_ids=np.arange(50))
    made["influences.csv"] = tmp_path / "influences.csv"
    pd.DataFrame({"q": range(200), "s": np.linspace(0, 1, 200)}).to_csv(made["influences.csv"], index=False)
    made["manifest.json"] = tmp_path / "manifest.json"
    made["manifest.json"].write_text(json.dumps({"rows": list(range(300))}))
    tokens = tmp_path / "tokens"
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 500}).save_to_disk(str(tokens))
    for path in [*made.values(), tokens]:
        assert check_artifact(path) is None, path  # whole: nothing to say
    for name, path in made.items():
        truncate(path)
        problem = check_artifact(path)
        assert problem and problem.startswith(str(path)), (name, problem)
    arrow = next(tokens.glob("*.arrow"))
    truncate(arrow)
    assert check_artifact(tokens).startswith(str(arrow))  # a folder names its broken file
    assert "truncated" in check_artifact(made["adapter_model.safetensors"])
    assert "ends in the middle of a line" in check_artifact(made["influences.csv"])


def test_a_job_reading_a_truncated_input_names_it_and_the_target_to_rebuild(tmp_path, monkeypatch, capsys):
    """Checked to fail without the diagnosis in run_stage (diagnose_inputs returning None): the terminal then shows
    only pyarrow's 'Parquet magic bytes not found'."""
    from playpen_attribution.stage import run_stage

    monkeypatch.chdir(tmp_path)
    table = Path("results/demo/data/train.parquet")
    table.parent.mkdir(parents=True)
    pd.DataFrame({"row_id": [f"train-{i:06d}" for i in range(500)]}).to_parquet(table)
    truncate(table, 0.3)
    job = SimpleNamespace(log=[str(tmp_path / "job.log")], threads=1, resources=SimpleNamespace(gpu=0),
                          rule="tokenize", input=[str(table)])
    with pytest.raises(SystemExit):
        run_stage(job, lambda: pd.read_parquet(table))
    terminal = capsys.readouterr().err
    assert "ERROR in rule tokenize: results/demo/data/train.parquet cannot be read as parquet" in terminal
    assert "rebuild it with `snakemake results/demo/data/train.parquet --force`" in terminal
    assert "the reader's error" in terminal
    # a source the run reads (not under results/) is to be replaced, not rebuilt
    source = tmp_path / "source.parquet"
    shutil.copy(table, source)
    assert "a source of the run, not built by the workflow: replace it" in diagnose_inputs([str(source)])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_locks_of_a_dead_owner_are_removed_and_a_live_owners_are_kept(tmp_path):
    """Checked to fail without the pid check (`_running_snakemake` returning False): the live owner's locks go."""
    import socket

    from playpen_attribution.locks import LOCKS, OWNER_FILE, record_owner, remove_stale_locks

    def lock(pid, host=None):
        (tmp_path / LOCKS).mkdir(parents=True, exist_ok=True)
        (tmp_path / LOCKS / "0.input.lock").write_text("results/demo/adapter\n")
        (tmp_path / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))

    lock(_dead_pid())
    assert "removed the locks of a Snakemake process that no longer runs" in remove_stale_locks(tmp_path)
    assert not list((tmp_path / LOCKS).glob("*.lock")) and not (tmp_path / OWNER_FILE).exists()
    # a live Snakemake holds its locks: the second invocation is refused by Snakemake itself
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "snakemake"])
    try:
        lock(live.pid)
        assert remove_stale_locks(tmp_path) is None and (tmp_path / LOCKS / "0.input.lock").exists()
    finally:
        live.kill()
        live.wait()
    lock(_dead_pid(), host="another-node")  # another host's process cannot be checked from here
    assert remove_stale_locks(tmp_path) is None and (tmp_path / LOCKS / "0.input.lock").exists()
    (tmp_path / OWNER_FILE).unlink()  # no record (an older run): left to Snakemake's --unlock advice
    assert remove_stale_locks(tmp_path) is None
    record_owner(tmp_path)
    assert json.loads((tmp_path / OWNER_FILE).read_text())["pid"] == os.getpid()


def test_a_job_that_dies_mid_write_leaves_no_output(tmp_path):
    """Outputs are written under a temporary name and renamed at the end (io.atomic_path): a stage killed after
    writing part of its output leaves neither the output nor anything under its name."""
    from playpen_attribution.io import atomic_path

    target = tmp_path / "factors"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, directory=True) as tmp:
            (Path(tmp) / "covariance.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt  # what a kill signal turns into inside Python
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == []
    csv = tmp_path / "influences.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(csv) as tmp:
            Path(tmp).write_text("query_id,train_id\nq0,")
            raise RuntimeError("disk full")
    assert not csv.exists()
