"""Running a package function as a Snakemake `script:` with the log in `snakemake.log[0]`."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
import traceback
from pathlib import Path

from playpen_attribution.devices import (
    is_cuda_oom,
    log_gpu_memory,
    record_cuda_oom,
    refuse_repeated_cuda_oom,
    settle_job_device,
    triton_cache_in,
)

CUDA_OOM_FIX = ("Lower the batch sizes of the stage (the memory plan, results/<run>/plan.txt, names the setting of its "
                "largest part), or ask for a larger GPU (resources.gpu_mem_gb and the SLURM profile's constraint)")

PEAK_RSS_LINE = "peak resident memory (getrusage): {:.0f} MB"
# One line per forward+backward pass over a tokenized dataset (or a slice of it), for bench/gradient_passes.py.
GRADIENT_PASS_LINE = "gradient pass: {rows} rows, {tokens} tokens of {dataset} ({purpose})"


# Tokens this process passed through forward+backward passes (log_gradient_pass), for the job's throughput line.
_passed_tokens = [0]
THROUGHPUT_LINE = "throughput: {tokens} tokens of gradient passes in {seconds:.1f} s, {rate:.0f} tokens/s (whole job)"


def log_gradient_pass(dataset_dir, rows: int, tokens: int, purpose: str) -> None:
    """Record a pass in the job's log (stderr: the libraries raise the logging level)."""
    _passed_tokens[0] += tokens
    print(GRADIENT_PASS_LINE.format(rows=rows, tokens=tokens, dataset=dataset_dir, purpose=purpose), file=sys.stderr,
          flush=True)


# Times a benchmark wants to tell apart (training, losses) go to the log, never into an artifact: artifacts stay
# byte-identical between runs of the same inputs.
TIME_LINE = "time: {what}: {seconds:.3f} s"


def log_time(what: str, seconds: float) -> None:
    print(TIME_LINE.format(what=what, seconds=seconds), file=sys.stderr, flush=True)


def token_count(dataset) -> int:
    return sum(map(len, dataset["input_ids"]))


def keep_inputs_unchanged() -> None:
    """`datasets` caches a transform of a saved dataset as cache-*.arrow files inside that dataset's folder: a job
    reading `data/tokens/train` would write into another rule's finished output (and change its hash while other
    jobs read it). With caching off, transforms go to a temporary folder."""
    import datasets

    datasets.disable_caching()


def use_job_threads(threads: int) -> None:
    """Compute with the threads Snakemake gave the job (its `threads:`, 1 unless the rule says more; on SLURM its
    --cpus-per-task), not with every core: torch starts one thread per core in each process, so two jobs side by
    side on two cores would run four threads and slow each other down. Set before torch is imported (the stages
    import it lazily); torch's own setting too, where something imported it already."""
    threads = str(max(1, int(threads)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def settings_digest(snakemake) -> str:
    """The job's inputs and params, as a digest: what a retry would run with."""
    import hashlib

    params = getattr(snakemake, "params", None)
    items = sorted(dict(params.items()).items()) if hasattr(params, "items") else []
    text = repr((sorted(getattr(snakemake, "input", []) or []), items))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_stage(snakemake, function, **kwargs):
    """Call `function(**kwargs)` with logging, warnings and library output sent to the rule's log file.

    On failure the traceback goes to the log and the error's one-line message to the terminal, so a
    bad input is explained where the user looks, then the job fails.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    use_job_threads(snakemake.threads)
    keep_inputs_unchanged()
    log_path = snakemake.log[0] if snakemake.log else os.devnull
    wants_gpu = int(getattr(snakemake.resources, "gpu", 0) or 0) > 0
    triton_cache_in(getattr(snakemake.resources, "tmpdir", None))
    terminal = sys.stderr
    started, _passed_tokens[0] = time.perf_counter(), 0
    with open(log_path, "w") as log_file, contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
        logging.basicConfig(level=logging.INFO, stream=log_file, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.captureWarnings(True)
        oom_record = Path(f"{log_path}.cuda-oom.json") if snakemake.log else None
        try:
            device = settle_job_device(wants_gpu)  # before the stage imports torch
            if device is not None:
                logging.getLogger(__name__).info("GPU %s (CUDA_VISIBLE_DEVICES)", device)
                if oom_record:
                    refuse_repeated_cuda_oom(oom_record, settings_digest(snakemake), CUDA_OOM_FIX)
            result = function(**kwargs)
            if oom_record:
                oom_record.unlink(missing_ok=True)
            return result
        except Exception as err:
            if oom_record and is_cuda_oom(err):
                record_cuda_oom(oom_record, settings_digest(snakemake), err)
            traceback.print_exc(file=log_file)
            log_file.flush()
            from playpen_attribution.artifacts import diagnose_inputs

            # a truncated or corrupt input is named, with how to rebuild it, before the reader's own message
            broken = diagnose_inputs(list(getattr(snakemake, "input", []) or []))
            if broken:
                print(f"input check: {broken}", file=log_file, flush=True)
            cause = f"{broken}\n(the reader's error: {type(err).__name__}: {err})" if broken else \
                f"{type(err).__name__}: {err}"
            print(f"\nERROR in rule {snakemake.rule}: {cause}\n(full traceback in {log_path})", file=terminal)
            raise SystemExit(1) from None
        finally:
            # the kernel's true peak: Snakemake's benchmark samples memory every 30 s after a job's first 30 s
            # (written straight to the log: libraries such as Kronfluence raise the logging level)
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(PEAK_RSS_LINE.format(peak_mb), file=log_file, flush=True)
            gpu_peak = log_gpu_memory()
            if gpu_peak:
                print(gpu_peak, file=log_file, flush=True)
            if _passed_tokens[0]:  # model loading included: what a job of this kind costs, per token
                seconds = time.perf_counter() - started
                print(THROUGHPUT_LINE.format(tokens=_passed_tokens[0], seconds=seconds,
                                             rate=_passed_tokens[0] / max(seconds, 1e-9)), file=log_file, flush=True)
