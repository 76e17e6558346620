"""A GPU node's traps, faked on a CPU: a GPU torch cannot use, several GPUs shared by concurrent jobs, CPU jobs that
must not touch a GPU, and training that must never wrap the model in DataParallel."""

import re
import subprocess
import sys
import textwrap
import time

import pytest

from playpen_attribution import devices


def unset(monkeypatch, name):
    """Remove `name` from the environment for this test only: monkeypatch.delenv of an absent variable records
    nothing, so a value the code under test sets would outlive the test (and reach later tests' subprocesses)."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """run_stage sets torch's thread count to the job's: the tests after these keep the session's."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """`nvidia-smi` on PATH reporting `n` GPUs and driver 535.104.05 (a CUDA 12.2 driver), no CUDA_VISIBLE_DEVICES."""
    def install(n):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        gpus = "\\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})" for i in range(n))
        script = bin_dir / "nvidia-smi"
        script.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            case "$1" in
              -L) printf '{gpus}\\n' ;;
              --query-gpu=driver_version) echo 535.104.05 ;;
            esac
            """))
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
        unset(monkeypatch, "CUDA_VISIBLE_DEVICES")
        monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path / "locks"))
        return bin_dir
    return install


def test_a_gpu_torch_cannot_use_stops_the_job_with_driver_cuda_and_fix(fake_gpus, monkeypatch):
    import torch

    fake_gpus(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(devices.DeviceError) as err:
        devices.settle_job_device(wants_gpu=True)
    message = str(err.value)
    for part in ("NVIDIA driver 535.104.05", "built for CUDA 13.0", "needs driver 580.65.06 or newer",
                 "install a torch 2.11.0 build for the CUDA your driver supports", "rather than running on the CPU"):
        assert part in message, part
    # SLURM's allocation is what the job was given
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(devices.DeviceError, match=r"CUDA_VISIBLE_DEVICES='3'"):
        devices.settle_job_device(wants_gpu=True)


def test_no_gpu_on_the_machine_runs_gpu_jobs_on_the_cpu_and_cpu_jobs_never_see_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    unset(monkeypatch, "CUDA_VISIBLE_DEVICES")
    assert devices.settle_job_device(wants_gpu=True) is None
    assert "CUDA_VISIBLE_DEVICES" not in __import__("os").environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert devices.settle_job_device(wants_gpu=False) is None
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == ""


def test_concurrent_gpu_jobs_each_hold_a_different_device_and_a_surplus_job_waits(fake_gpus, tmp_path):
    """Four jobs on three GPUs: the first three hold three different devices at the same time (each waits for the
    others to report before it lets go); the fourth waits until one is released, then gets that one."""
    fake_gpus(3)
    child = textwrap.dedent("""\
        import os, sys, time
        from pathlib import Path
        from playpen_attribution.devices import claim_one, visible_devices
        out, release = Path(sys.argv[1]), Path(sys.argv[2])
        device = claim_one(visible_devices(), poll_seconds=0.1)
        out.write_text(device)
        while not release.exists():
            time.sleep(0.05)
        """)
    jobs = []
    for i in range(3):
        jobs.append(subprocess.Popen([sys.executable, "-c", child, str(tmp_path / f"job{i}"), str(tmp_path / "go")]))
    deadline = time.time() + 60
    while not all((tmp_path / f"job{i}").exists() for i in range(3)) and time.time() < deadline:
        time.sleep(0.05)
    held = {(tmp_path / f"job{i}").read_text() for i in range(3)}
    assert held == {"0", "1", "2"}  # three different devices, all held at once
    surplus = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "job3"), str(tmp_path / "later")],
                               stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert not (tmp_path / "job3").exists()  # every device is held: it waits
    (tmp_path / "go").write_text("")
    for job in jobs:
        assert job.wait(timeout=60) == 0
    deadline = time.time() + 60
    while not (tmp_path / "job3").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "job3").read_text() in held
    (tmp_path / "later").write_text("")
    assert surplus.wait(timeout=60) == 0
    assert "every GPU (0,1,2) is held by another job; waiting" in surplus.stderr.read()


def test_a_gpu_job_sees_only_its_own_device(fake_gpus, monkeypatch):
    import torch

    fake_gpus(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = devices.settle_job_device(wants_gpu=True)
    assert device in ("0", "1") and __import__("os").environ["CUDA_VISIBLE_DEVICES"] == device


def test_training_refuses_more_than_one_visible_gpu():
    devices.single_device_check(1)
    with pytest.raises(devices.DeviceError, match="would wrap the model in DataParallel"):
        devices.single_device_check(2)


def test_a_stage_settles_its_device_and_threads_before_it_runs(tmp_path, monkeypatch):
    """run_stage (every rule script): a CPU job sees no GPU; every job computes with its Snakemake threads."""
    import os
    from types import SimpleNamespace

    from playpen_attribution.stage import run_stage

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        unset(monkeypatch, name)
    seen = {}

    def stage():
        import torch

        from playpen_attribution.stage import log_gradient_pass

        seen.update(cuda=os.environ["CUDA_VISIBLE_DEVICES"], omp=os.environ["OMP_NUM_THREADS"],
                    torch_threads=torch.get_num_threads())
        log_gradient_pass("tokens/train", rows=3, tokens=600, purpose="test")
        log_gradient_pass("tokens/train", rows=3, tokens=600, purpose="test")

    job = SimpleNamespace(log=[str(tmp_path / "job.log")], threads=1, resources=SimpleNamespace(gpu=0), rule="r")
    run_stage(job, stage)
    assert seen == {"cuda": "", "omp": "1", "torch_threads": 1}
    log = (tmp_path / "job.log").read_text()
    assert "peak resident memory" in log
    assert re.search(r"throughput: 1200 tokens of gradient passes in [\d.]+ s, \d+ tokens/s \(whole job\)", log)


def test_cuda_training_needs_triton_build_tools_and_names_what_is_missing(tmp_path, monkeypatch):
    import sysconfig

    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler
    unset(monkeypatch, "CC")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-headers")})
    read_only = tmp_path / "cache"
    read_only.mkdir()
    read_only.chmod(0o500)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(read_only))
    problems = devices.triton_toolchain_problems()
    assert problems[0].startswith("no C compiler") and problems[1].startswith("no Python headers")
    if __import__("os").geteuid() != 0:  # root writes anywhere
        assert "is not writable" in problems[2]
    with pytest.raises(devices.DeviceError, match=r"compiles TRL's loss kernels with Triton .* no C compiler .* "
                                                  r"apt-get install gcc python3-dev"):
        devices.check_triton_toolchain()


def test_each_job_gets_its_own_triton_cache_in_its_tmp_folder(tmp_path, monkeypatch):
    unset(monkeypatch, "TRITON_CACHE_DIR")
    devices.triton_cache_in(str(tmp_path))
    assert __import__("os").environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton-cache")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/users/choice")
    devices.triton_cache_in(str(tmp_path))
    assert __import__("os").environ["TRITON_CACHE_DIR"] == "/users/choice"


def test_a_cuda_out_of_memory_error_is_not_run_again_on_the_same_gpu_with_the_same_settings(tmp_path, monkeypatch):
    """The SLURM profile retries failed jobs with more host memory and time; after a CUDA OOM that cannot help: the
    retry stops at once. A different GPU, or other settings, run again."""
    from types import SimpleNamespace

    import torch

    from playpen_attribution import stage

    gpu = {"name": "NVIDIA A100-SXM4-40GB, 40 GB"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # run_stage sets them
        unset(monkeypatch, name)
    monkeypatch.setattr(stage, "settle_job_device", lambda wants_gpu: "0")
    monkeypatch.setattr(devices, "gpu_identity", lambda: gpu["name"])
    calls = []

    def out_of_memory():
        calls.append(1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def job(batch_size):
        return SimpleNamespace(log=[str(tmp_path / "fit.log")], threads=1, resources=SimpleNamespace(gpu=1),
                               rule="fit_factors", input=["results/r/adapter"],
                               params=SimpleNamespace(items=lambda: [("batch_size", batch_size)]))

    with pytest.raises(SystemExit):
        stage.run_stage(job(8), out_of_memory)
    assert len(calls) == 1 and (tmp_path / "fit.log.cuda-oom.json").is_file()
    with pytest.raises(SystemExit):  # the retry: refused before the stage runs
        stage.run_stage(job(8), out_of_memory)
    assert len(calls) == 1
    assert "ran out of GPU memory on this GPU (NVIDIA A100-SXM4-40GB, 40 GB) with the same settings" in (
        tmp_path / "fit.log").read_text()
    with pytest.raises(SystemExit):  # other settings run
        stage.run_stage(job(4), out_of_memory)
    assert len(calls) == 2
    gpu["name"] = "NVIDIA H100 80GB HBM3, 80 GB"  # a larger GPU runs, and success clears the record
    stage.run_stage(job(4), lambda: None)
    assert not (tmp_path / "fit.log.cuda-oom.json").exists()
