"""The device a job computes on, settled when the job starts, before anything imports torch.

- A model-holding job (the rules with `gpu=1`) on a machine that has NVIDIA GPUs gets exactly one of them. On SLURM
  that is the one the scheduler gave it (`CUDA_VISIBLE_DEVICES`); run locally with `--resources gpu=N`, each job takes
  the first device no other job holds (a lock file per device, held for the job's life) and then sees only that one,
  so the Trainer never wraps the model in DataParallel and Kronfluence's and Bergson's `cuda:0` is the job's own.
- A job that was given a GPU and cannot use it stops at once, naming the driver, torch's CUDA version and the fix:
  torch 2.11.0 from PyPI is built for CUDA 13.0, and on an older driver `torch.cuda.is_available()` is only False, so
  every stage would run on the CPU for hours.
- A job without `gpu` (Bergson's scoring from the index, merges, the report) sees no GPU at all: some of them
  (Bergson's `Attributor`) pick CUDA when they see it, outside the workflow's `gpu` counter.
- With no GPU on the machine the `gpu=1` jobs are CPU jobs, as in the demo.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch 2.11.0's CUDA 13.0 build needs at least this Linux driver (NVIDIA's CUDA 13.0 release notes).
CUDA13_MIN_DRIVER = "580.65.06"
LOCK_DIR_ENV = "PLAYPEN_GPU_LOCK_DIR"
# the open lock file of the device this process holds (closed, and so released, when the process ends)
_held = None


class DeviceError(RuntimeError):
    """A job that was given a GPU it cannot use."""


def _nvidia_smi(*args: str) -> str:
    """What `nvidia-smi` prints; empty without it (no NVIDIA driver) or when it fails."""
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def visible_devices() -> list[str]:
    """The GPUs this process may use, without importing torch: `CUDA_VISIBLE_DEVICES` where set (SLURM sets it), else
    every GPU `nvidia-smi -L` lists; none without either."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    gpus = [line for line in _nvidia_smi("-L").splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(gpus))]


def driver_version() -> str | None:
    words = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader").split()
    return words[0] if words else None


def _lock_dir() -> Path:
    path = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "playpen-attribution-gpu-locks")
    path.mkdir(parents=True, exist_ok=True)
    return path


def claim_one(devices: list[str], poll_seconds: float = 2.0) -> str:
    """The first of `devices` no other process on this machine holds, locked for this process's life; waits while
    every one is held (more `gpu` jobs than devices)."""
    global _held
    waited = False
    while True:
        for device in devices:
            handle = open(_lock_dir() / f"gpu-{device}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            handle.seek(0), handle.truncate(), handle.write(f"{os.getpid()}\n"), handle.flush()
            _held = handle
            return device
        if not waited:
            print(f"every GPU ({','.join(devices)}) is held by another job; waiting", file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll_seconds)


def cuda_unusable_message(driver: str | None, torch_cuda: str | None) -> str:
    return (f"this job was given a GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) but torch "
            f"cannot use it: NVIDIA driver {driver or 'not found (nvidia-smi missing)'}, torch "
            f"{_torch_version()} built for CUDA {torch_cuda or 'none (a CPU-only build)'}. torch's CUDA 13.0 build "
            f"needs driver {CUDA13_MIN_DRIVER} or newer: update the node's driver, or install a torch 2.11.0 build for "
            f"the CUDA your driver supports (README, 'GPU nodes': a uv index for PyTorch's cu126 wheels). Stopping "
            f"rather than running on the CPU for hours.")


def _torch_version() -> str:
    import torch

    return torch.__version__


def check_cuda_usable() -> None:
    """Stop with the driver, torch's CUDA and the fix when torch cannot use the GPU this job was given."""
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(cuda_unusable_message(driver_version(), torch.version.cuda))


def settle_job_device(wants_gpu: bool) -> str | None:
    """Call first in a job, before torch is imported. Returns the device this job holds (its index as the machine
    numbers it) or None for a CPU job."""
    if not wants_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job never touches a GPU
        return None
    devices = visible_devices()
    if not devices:
        return None  # no GPU here: the model-holding jobs run on the CPU
    device = devices[0] if len(devices) == 1 else claim_one(devices)
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    check_cuda_usable()
    return device


def triton_cache_in(tmpdir: str | None) -> None:
    """Triton compiles TRL's loss kernels on a job's first CUDA step into ~/.triton by default: on a cluster that
    home may be read-only, full or shared by many jobs at once. Each job gets its own cache in its tmp folder
    (Snakemake's `tmpdir` resource: $TMPDIR, which SLURM sets per job) unless the user chose one."""
    if tmpdir and "TRITON_CACHE_DIR" not in os.environ:
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmpdir) / "triton-cache")


def triton_toolchain_problems() -> list[str]:
    """What Triton needs to JIT-compile TRL 1.16's chunked loss on CUDA (its launcher is C, built on first use): a C
    compiler, the Python headers, a writable cache folder. Empty when all is there."""
    import sysconfig

    problems = []
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler or not shutil.which(compiler):
        problems.append("no C compiler (cc, gcc or clang on PATH, or $CC)")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        problems.append(f"no Python headers ({headers} is missing)")
    cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache):
            pass
    except OSError as err:
        problems.append(f"Triton's cache {cache} is not writable ({err.strerror}); set TRITON_CACHE_DIR")
    return problems


def check_triton_toolchain() -> None:
    """Before a CUDA training job loads its model: TRL computes the loss with Triton kernels there."""
    problems = triton_toolchain_problems()
    if problems:
        raise DeviceError("training on CUDA compiles TRL's loss kernels with Triton on first use, and this node has "
                          + "; ".join(problems) + ". Install them on the compute node (Debian/Ubuntu: apt-get install "
                          "gcc python3-dev; on a cluster often `module load gcc`) or run training where they are.")


# ---------------------------------------------------------------------------------------------------------
# a CUDA out-of-memory error is not retried on the same GPU with the same settings
# ---------------------------------------------------------------------------------------------------------
def gpu_identity() -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 1e9:.0f} GB"


def is_cuda_oom(err: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)


def record_cuda_oom(record: Path, settings_digest: str, err: BaseException) -> None:
    """Remember that this job ran out of GPU memory, on which GPU and with which settings."""
    import json

    record.write_text(json.dumps({"settings": settings_digest, "gpu": gpu_identity(), "error": str(err)[:500]}))


def refuse_repeated_cuda_oom(record: Path, settings_digest: str, fix: str) -> None:
    """Before a GPU job loads anything: if its last run ran out of GPU memory on the same kind of GPU with the same
    settings, a retry (Snakemake's, with more host memory and time) cannot succeed: stop at once instead of running
    for hours to the same failure. A different GPU or changed settings run; deleting the record forces a run."""
    import json

    if not record.is_file():
        return
    last = json.loads(record.read_text())
    if last["settings"] == settings_digest and last["gpu"] == gpu_identity():
        raise DeviceError(f"the last run of this job ran out of GPU memory on this GPU ({last['gpu']}) with the same "
                          f"settings ({last['error'][:200]}); a retry cannot succeed. {fix}; or delete {record} to "
                          f"try again as it is")


def single_device_check(n_gpu: int) -> None:
    """Training on one device only: more would make the Trainer wrap the model in DataParallel (an N-times larger
    batch than the manifest says, or a device-mismatch crash with TRL's patched forward)."""
    if n_gpu > 1:
        raise DeviceError(f"training sees {n_gpu} GPUs and would wrap the model in DataParallel; a job must see one "
                          f"(CUDA_VISIBLE_DEVICES): run it through the workflow, which gives each job its own")


GPU_PEAK_LINE = "peak GPU memory (torch.cuda): {:.0f} MB allocated, {:.0f} MB reserved"


def log_gpu_memory() -> str | None:
    """The job's peak GPU memory (allocated by tensors and reserved by the caching allocator), for its log; None
    without CUDA or where torch was never imported."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return GPU_PEAK_LINE.format(torch.cuda.max_memory_allocated() / 1e6, torch.cuda.max_memory_reserved() / 1e6)
