"""The SLURM workflow profile (profiles/slurm), run through the real executor plugin against the fake SLURM
commands in tests/fake_slurm, which log every call and run each submitted job here, in the background."""

import importlib.util
import json
import os
import re
import signal

import pytest
import yaml

from conftest import REPO, background_run, snakemake, snakemake_command

pytestmark = pytest.mark.slow

PROFILE = REPO / "profiles" / "slurm"
FAKE_SLURM = REPO / "tests" / "fake_slurm"
# The cheapest run with a GPU rule; its training resources are the demo's (4000 MB, 30 min).
RUN = "test_query"

_spec = importlib.util.spec_from_file_location("_fake_slurm", FAKE_SLURM / "_fake_slurm.py")
fake_slurm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_slurm)


def profile():
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def run_resources(run):
    from playpen_attribution.config import validate_config

    config = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    return config["runs"][run]["resources"]


def calls(log, cmd):
    return [c for c in map(json.loads, log.read_text().splitlines()) if c["cmd"] == cmd]


def submission(call):
    """An sbatch call as {option: value}, with its rule and Snakemake attempt."""
    options, _ = fake_slurm.parse_options(call["argv"])
    opts = dict(options)
    opts["rule"] = fake_slurm.rule_of(opts["--comment"])
    opts["attempt"] = int(re.search(r"--attempt '?(\d+)", opts["--wrap"]).group(1))
    return opts


def submitted_run(root, demo):
    """The profile's run of the cheapest GPU rule's target against the fake SLURM commands (its folder: `root`):
    training hits its time limit once, the tiny model's build is killed for memory once, one tokenize job is
    preempted once (SLURM requeues it). Started in the background at collection (conftest)."""
    state = root / "fake-slurm"
    workdir = root / "work"
    workdir.mkdir()
    env = {**os.environ, "PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state),
           "FAKE_SLURM_LOG": str(state / "calls.jsonl"),
           "FAKE_SLURM_ACCOUNTS": f"other-account,{profile()['default-resources']['slurm_account']}",
           "FAKE_SLURM_FAIL_ONCE": "train_adapter:TIMEOUT,build_tiny_model,tokenize:PREEMPTED",
           # status queries wait for running jobs (just under the plugin's 60 s limit on one query), so a poll finds
           # a job finished unless it runs longer than that; only then the plugin's interval grows (10 s per empty
           # poll)
           "FAKE_SLURM_SACCT_WAIT": "55"}

    def end_left_jobs():
        """A failed or timed-out run may leave jobs behind: end them by their process group."""
        for job in fake_slurm.all_jobs(state):
            if job.get("pid") and job["state"] not in fake_slurm.DONE:
                try:
                    os.killpg(job["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass

    return {"cmd": snakemake_command(workdir, "--workflow-profile", str(PROFILE),
                                     "--slurm-init-seconds-before-status-checks", "1", f"results/{RUN}/adapter"),
            "env": env, "cleanup": end_left_jobs,
            "timeout": 900}  # a slow machine's long jobs grow the poll interval


BACKGROUND_RUNS = {"slurm_profile_run": submitted_run}


@pytest.fixture
def slurm_profile_run():
    """The finished run's folder: `work` (the project) and `fake-slurm` (the fake SLURM's calls and jobs)."""
    return background_run("slurm_profile_run")["root"]


def test_slurm_profile_submits_gpu_jobs_and_retries_bigger(slurm_profile_run):
    log = slurm_profile_run / "fake-slurm" / "calls.jsonl"
    settings = profile()
    workdir = slurm_profile_run / "work"

    assert (workdir / "results" / RUN / "adapter" / "adapter_model.safetensors").exists()
    submitted = [submission(c) for c in calls(log, "sbatch")]
    rules = [s["rule"] for s in submitted]
    # prepare_data is a localrule; the tiny model and tokenization are SLURM jobs
    assert "prepare_data" not in rules
    assert {"build_tiny_model", "tokenize"} <= set(rules)
    # the account was checked the way the plugin checks it
    assert any(c["argv"][:4] == ["-n", "-s", "list", "user"] for c in calls(log, "sacctmgr"))

    account = settings["default-resources"]["slurm_account"]
    cpu_partition = settings["default-resources"]["slurm_partition"]
    gpu_partition = settings["set-resources"]["train_adapter"]["slurm_partition"]
    for s in submitted:
        assert s["-A"] == account
        if s["rule"] != "train_adapter":
            assert s["-p"] == cpu_partition and "--gpus" not in s
            assert (s["--mem"], s["-t"]) == (str(settings["default-resources"]["mem_mb"]),
                                             str(settings["default-resources"]["runtime"]))

    train = [s for s in submitted if s["rule"] == "train_adapter"]
    assert [s["attempt"] for s in train] == [1, 2], "the time limit of attempt 1 is retried once, with more time"
    assert [s["attempt"] for s in submitted if s["rule"] == "build_tiny_model"] == [1, 2]  # killed for memory once
    # the preempted tokenize job is requeued by SLURM (the profile's --requeue) and finishes under its own id:
    # no resubmission, and Snakemake waits for it
    assert all("--requeue" in c["argv"] for c in calls(log, "sbatch"))
    jobs = {j["jobid"]: j for j in fake_slurm.all_jobs(slurm_profile_run / "fake-slurm")}
    tokenize = [s for s in submitted if s["rule"] == "tokenize"]
    assert tokenize and all(s["attempt"] == 1 for s in tokenize)
    requeued = [j for j in jobs.values() if j.get("requeued")]
    assert len(requeued) == 1 and requeued[0]["rule"] == "tokenize" and requeued[0]["state"] == "COMPLETED"
    assert {j["state"] for j in jobs.values() if j["rule"] == "train_adapter"} == {"TIMEOUT", "COMPLETED"}
    expected = run_resources(RUN)
    for s in train:
        assert s["--gpus"] == "1" and s["-p"] == gpu_partition
        assert s["--cpus-per-task"] == str(expected["threads"])  # resources.threads: 1 for this tiny model
        assert s["--mem"] == str(expected["train_mem_mb"] * s["attempt"])
        assert s["-t"] == str(expected["train_runtime_min"] * s["attempt"])
    # inside the job, the jobstep plugin asks srun for the GPU again
    steps = [c for c in calls(log, "srun") if "train_adapter" in " ".join(c["argv"])]
    assert len(steps) == 1 and "--gpus=1" in steps[0]["argv"]


def test_slurm_profile_dry_run_plans_gpu_rules_on_gpu_partition(tmp_path):
    settings = profile()
    # the damping sweep of EK-FAC too, so that every GPU rule of the workflow is planned
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"runs": {"taboo": {"validation": {"damping": {
        "methods": ["ekfac", "bergson_cosine_train", "bergson_cosine_mixed"]}}}}}))
    proc = snakemake(tmp_path, "--workflow-profile", str(PROFILE), "--dry-run",
                     "results/taboo/report/index.html", "--configfile", str(sweep))
    planned, rule = {}, None  # rule -> the resource lines of its jobs
    for line in proc.stdout.splitlines():
        if match := re.match(r"(?:local)?rule (\w+):$", line):
            rule = match.group(1)
        elif rule and (match := re.match(r"\s+resources: (.*)", line)):
            planned.setdefault(rule, set()).add(match.group(1))
    gpu_rules = {rule for rule, res in planned.items() if any(re.search(r"\bgpu=1\b", r) for r in res)}
    assert {"fetch_base_model", "prepare_data", "tokenize"} <= set(planned) - gpu_rules
    assert {"train_adapter", "fit_factors", "kronfluence_scores", "bergson_index", "damping_sweep_kronfluence"} <= gpu_rules
    assert "bergson_scores" not in gpu_rules  # scored from the index on a CPU node: no model, no GPU queue
    # every GPU rule of this DAG, and only those, goes to the GPU partition (the taboo runs have no removal check
    # and no TrackStar: the static test below covers every rule)
    assert gpu_rules == set(settings["set-resources"]) & set(planned)
    for rule, resources in planned.items():
        partition = settings["set-resources"].get(rule, settings["default-resources"])["slurm_partition"]
        assert all(f"slurm_partition={partition}" in r for r in resources), rule


def test_gpu_type_and_capped_retries_reach_the_gpu_jobs(tmp_path):
    """A GPU constraint added to the profile's GPU entry reaches every GPU job and no CPU job; the runs'
    resources.max_mem_mb / max_runtime_min cap what a retry may ask for."""
    settings = profile()
    for entry in settings["set-resources"].values():
        entry["constraint"] = "a100_80g"
    folder = tmp_path / "profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    caps = tmp_path / "caps.yaml"
    caps.write_text(yaml.safe_dump({"runs": {"taboo": {"resources": {"gpu_mem_gb": 80, "max_mem_mb": 20000,
                                                                     "max_runtime_min": 100}}}}))
    proc = snakemake(tmp_path, "--workflow-profile", str(folder), "--dry-run", "results/taboo/report/index.html",
                     "--configfile", str(caps))
    planned, rule = {}, None
    for line in proc.stdout.splitlines():
        if match := re.match(r"(?:local)?rule (\w+):$", line):
            rule = match.group(1)
        elif rule and (match := re.match(r"\s+resources: (.*)", line)):
            planned.setdefault(rule, []).append(dict(kv.split("=", 1) for kv in match.group(1).split(", ")))
    for rule, jobs in planned.items():
        for res in jobs:
            assert (res.get("constraint") == "a100_80g") == (res.get("gpu") == "1"), rule
            assert int(res.get("mem_mb", 0)) <= 20000 and int(res.get("runtime", 0)) <= 100, (rule, res)
    # the caps bind: the EK-FAC fit's plan asks for more, training's configured time is longer
    assert planned["fit_factors"][0]["mem_mb"] == "20000" and planned["train_adapter"][0]["runtime"] == "100"


def test_every_gpu_rule_goes_to_the_gpu_partition():
    """Static: each rule that asks for `gpu=1` (or a `use rule` of one) has the GPU partition in the profile, so a
    rule added later (the removal check's retrains were one) is not sent to the CPU partition."""
    import yaml

    from conftest import REPO

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    gpu_partition = profile["set-resources"]["train_adapter"]["slurm_partition"]
    on_gpu = {rule for rule, res in profile["set-resources"].items() if res.get("slurm_partition") == gpu_partition}
    from playpen_attribution.config_reference import rule_texts

    rules = rule_texts()

    def asks(name: str) -> bool:
        parent, body = rules[name]
        return bool(re.search(r"^\s+gpu=1,", body, flags=re.M)) or (parent in rules and asks(parent))

    asking = {name for name in rules if asks(name)}
    assert {"train_adapter", "removal_retrain", "planted_kronfluence_scores"} <= asking
    assert asking == on_gpu, (sorted(asking - on_gpu), sorted(on_gpu - asking))
