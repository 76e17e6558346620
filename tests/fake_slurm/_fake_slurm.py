"""A tiny stand-in for SLURM's client commands, enough for snakemake-executor-plugin-slurm 2.8 (and its jobstep
plugin 0.6) to run a workflow on this machine. Every command is a small script in this folder calling `main`.

Environment:
  FAKE_SLURM_DIR         state folder (job records, counters); default $TMPDIR/fake-slurm-$USER
  FAKE_SLURM_LOG         every call is appended here as one JSON line {"cmd", "argv", "jobid"?};
                         default $FAKE_SLURM_DIR/calls.jsonl
  FAKE_SLURM_FAIL_ONCE   comma-separated rule names, each optionally `rule:STATE`: the first submission of each
                         is not run and is reported as STATE (default OUT_OF_MEMORY; TIMEOUT: it hit its time
                         limit). `rule:PREEMPTED`: the first submission is preempted after it started; with
                         sbatch --requeue SLURM runs it again under the same job id, without it the job ends
                         PREEMPTED
  FAKE_SLURM_ACCOUNTS    comma-separated accounts `sacctmgr` lists for the user (default: fake-account)
  FAKE_SLURM_PARTITIONS  comma-separated partitions for `sinfo`, the default one marked with * (default: cpu*,gpu)
  FAKE_SLURM_SACCT_WAIT  seconds a status query (sacct/squeue --name) waits for running jobs to end before it
                         answers (default 0). The plugin adds 10 s to its poll interval after every poll that
                         sees nothing finished; a waiting fake keeps a test from paying that.

Jobs run for real, in the background, in their own session, with stdout and stderr in the --output file.
"""

import fcntl
import getpass
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# sbatch/srun options that take no value
FLAGS = {"--parsable", "--requeue", "--no-requeue", "--test-only", "--exclusive", "-h", "--help", "-Q", "--quiet",
         "-v", "--verbose"}
DONE = {"COMPLETED", "FAILED", "OUT_OF_MEMORY", "CANCELLED", "TIMEOUT"}


def state_dir():
    folder = Path(os.environ.get("FAKE_SLURM_DIR") or Path(tempfile.gettempdir()) / f"fake-slurm-{getpass.getuser()}")
    (folder / "jobs").mkdir(parents=True, exist_ok=True)
    return folder


def log_call(cmd, argv, **extra):
    path = Path(os.environ.get("FAKE_SLURM_LOG") or state_dir() / "calls.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps({"cmd": cmd, "argv": argv, **extra}) + "\n")


def write_json(path, data):
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def job_path(jobid):
    return state_dir() / "jobs" / f"{jobid}.json"


def read_job(jobid):
    try:
        return json.loads(job_path(jobid).read_text())
    except FileNotFoundError:
        return None


def update_job(jobid, **changes):
    with open(state_dir() / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        job = read_job(jobid)
        job.update(changes)
        write_json(job_path(jobid), job)


def all_jobs(folder=None):
    """Every job, from `folder` (a state folder, for a caller outside the fake commands) or FAKE_SLURM_DIR's."""
    jobs = []
    for path in sorted((Path(folder) if folder else state_dir()).glob("jobs/*.json"), key=lambda p: int(p.stem)):
        try:
            jobs.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    return jobs


def parse_options(argv):
    """(options as a list of (name, value) pairs, positional arguments) of an sbatch/srun-style command line."""
    options, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            return options, argv[i:]
        if "=" in arg and arg.startswith("--"):
            options.append(tuple(arg.split("=", 1)))
        elif arg in FLAGS:
            options.append((arg, True))
        elif not arg.startswith("--") and len(arg) > 2:  # -n1
            options.append((arg[:2], arg[2:]))
        else:
            i += 1
            options.append((arg, argv[i] if i < len(argv) else ""))
        i += 1
    return options, []


def option(options, *names, default=None):
    for name, value in reversed(options):
        if name in names:
            return value
    return default


def rule_of(comment):
    match = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment or "")
    return match.group(1) if match else None


def sbatch(argv):
    options, positional = parse_options(argv)
    folder = state_dir()
    with open(folder / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counter = folder / "last_jobid"
        jobid = int(counter.read_text()) + 1 if counter.exists() else 1001
        counter.write_text(str(jobid))
    log_call("sbatch", argv, jobid=jobid)

    workdir = option(options, "-D", "--chdir", default=os.getcwd())
    output = option(options, "-o", "--output", default="slurm-%j.out")
    output = str(Path(workdir, output.replace("%j", str(jobid))))
    wrap = option(options, "--wrap")
    if wrap is not None:
        script = "#!/bin/sh\n" + wrap + "\n"
    elif positional:
        script = sys.stdin.read() if positional[0] in ("/dev/stdin", "-") else Path(positional[0]).read_text()
    else:
        script = sys.stdin.read()
    script_path = folder / "jobs" / f"{jobid}.sh"
    script_path.write_text(script)

    rule = rule_of(option(options, "--comment"))
    fail_once = dict((item.split(":") + ["OUT_OF_MEMORY"])[:2] for item in
                     (r.strip() for r in os.environ.get("FAKE_SLURM_FAIL_ONCE", "").split(",")) if item)
    failed_marker = folder / f"failed_once.{rule}"
    job = {"jobid": jobid, "name": option(options, "-J", "--job-name", default="sbatch"), "rule": rule,
           "state": "PENDING", "output": output, "workdir": workdir, "submitted": time.time(),
           "requeue": "--requeue" in argv}
    failing = rule in fail_once and not failed_marker.exists()
    if failing and fail_once[rule] == "PREEMPTED":
        failed_marker.touch()
        job["preempt_once"] = True
        failing = False
    if failing:
        failed_marker.touch()
        job["state"] = fail_once[rule]
        job["exit_code"] = 137 if job["state"] == "OUT_OF_MEMORY" else 0
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(f"slurmstepd: error: Detected 1 oom_kill event in StepId={jobid}.batch (faked)\n"
                                if job["state"] == "OUT_OF_MEMORY" else
                                f"slurmstepd: error: *** JOB {jobid} CANCELLED DUE TO TIME LIMIT (faked) ***\n")
        write_json(job_path(jobid), job)
    else:
        write_json(job_path(jobid), job)
        env = {**os.environ, "SLURM_JOB_ID": str(jobid), "SLURM_JOBID": str(jobid),
               "SLURM_JOB_NAME": job["name"], "SLURM_SUBMIT_DIR": os.getcwd()}
        gpus = option(options, "--gpus", "-G")
        if gpus:
            env["SLURM_GPUS"] = str(gpus).split(":")[-1]
        cpus = option(options, "-c", "--cpus-per-task")
        if cpus:
            env["SLURM_CPUS_PER_TASK"] = str(cpus)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "ab") as out:
            # own session, no inherited pipes: sbatch returns at once, the job goes on
            proc = subprocess.Popen([sys.executable, __file__, "_run", str(jobid)], cwd=workdir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        update_job(jobid, pid=proc.pid)
    print(jobid if option(options, "--parsable") else f"Submitted batch job {jobid}")
    return 0


def run_job(jobid):
    """The background half of sbatch: run the job script and record how it ended."""
    update_job(jobid, state="RUNNING", started=time.time())
    script = state_dir() / "jobs" / f"{jobid}.sh"
    if read_job(jobid).get("preempt_once"):
        # preempted a moment after it started: the job's process is killed before it finishes
        update_job(jobid, state="PREEMPTED", preempted=time.time())
        time.sleep(3)  # long enough for a status query to see it
        if not read_job(jobid)["requeue"]:
            update_job(jobid, ended=time.time())
            return 0
        update_job(jobid, state="RUNNING", requeued=True, started=time.time())
    rc = subprocess.call(["/bin/sh", str(script)])
    job = read_job(jobid)
    if job["state"] == "CANCELLED":
        return 0
    update_job(jobid, state="COMPLETED" if rc == 0 else "FAILED", exit_code=rc, ended=time.time())
    return 0


def wanted_jobs(options):
    jobs = all_jobs()
    name = option(options, "--name")
    if name:
        jobs = [j for j in jobs if j["name"] in name.split(",")]
    ids = option(options, "-j", "--jobs")
    if ids:
        ids = {s.split(".")[0] for s in ids.split(",")}
        jobs = [j for j in jobs if str(j["jobid"]) in ids]
    return jobs


def wait_for_running(options):
    deadline = time.time() + float(os.environ.get("FAKE_SLURM_SACCT_WAIT", "0") or 0)
    while time.time() < deadline and any(j["state"] not in DONE for j in wanted_jobs(options)):
        time.sleep(0.2)


def sacct_field(job, field, step=None):
    field = field.split("%")[0].lower()
    if field in ("jobidraw", "jobid"):
        return f"{job['jobid']}" + (f".{step}" if step is not None else "")
    if field == "state":
        return job["state"]
    if field == "reason":
        return "OutOfMemory" if job["state"] == "OUT_OF_MEMORY" else "None"
    if field == "nodelist":
        return "fakenode1"
    if field == "account":
        return accounts()[0]
    if field == "exitcode":
        return f"{job.get('exit_code', 0)}:0"
    if field == "jobname":
        return job["name"]
    return ""


def sacct(argv):
    log_call("sacct", argv)
    if "-nu" in argv or "-u" in argv:  # the plugin guessing an account from the user's past jobs
        print(accounts()[0])
        return 0
    options, _ = parse_options([a for a in argv if a not in ("-X", "-n", "--noheader", "--parsable2", "-P")])
    fields = (option(options, "--format", "-o") or "JobIdRaw,State").split(",")
    step = None
    ids = option(options, "-j", "--jobs")
    if ids and "." in ids:
        step = ids.split(".", 1)[1]
    if option(options, "--name"):
        wait_for_running(options)
    for job in wanted_jobs(options):
        if step is not None and step != "0":  # one step per job
            continue
        sep = "|" if "--parsable2" in argv or "-P" in argv else " "
        print(sep.join(sacct_field(job, f, step) for f in fields))
    return 0


def squeue(argv):
    log_call("squeue", argv)
    options, _ = parse_options([a for a in argv if a not in ("--noheader", "-h")])
    fmt = option(options, "--format", "-o") or "%i|%T"
    if option(options, "--name"):
        wait_for_running(options)
    for job in wanted_jobs(options):
        print(fmt.replace("%i", str(job["jobid"])).replace("%T", job["state"]).replace("%j", job["name"]))
    return 0


def accounts():
    return [a.strip() for a in os.environ.get("FAKE_SLURM_ACCOUNTS", "fake-account").split(",") if a.strip()]


def sacctmgr(argv):
    """`sacctmgr -n -s list user <user> format=account%256`: the user's accounts, one a line."""
    log_call("sacctmgr", argv)
    for account in accounts():
        print(account)
    return 0


def sinfo(argv):
    """`sinfo -o %P`: partitions, the default one marked with *."""
    log_call("sinfo", argv)
    print("PARTITION")
    for partition in os.environ.get("FAKE_SLURM_PARTITIONS", "cpu*,gpu").split(","):
        print(partition.strip())
    return 0


def scontrol(argv):
    """`scontrol show config`: the two values the plugin reads."""
    log_call("scontrol", argv)
    if argv[:2] == ["show", "config"]:
        print("MaxArraySize            = 1001\nMinJobAge               = 300 sec")
    return 0


def scancel(argv):
    log_call("scancel", argv)
    _, positional = parse_options(argv)
    for jobid in " ".join(positional).replace(",", " ").split():
        job = read_job(jobid.split("_")[0])
        if job and job["state"] not in DONE:
            update_job(job["jobid"], state="CANCELLED")
            if job.get("pid"):
                try:
                    os.killpg(job["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass
    return 0


def srun(argv):
    """Inside a job: drop the step options and run the command in place."""
    log_call("srun", argv, jobid=os.environ.get("SLURM_JOB_ID"))
    _, command = parse_options(argv)
    if not command:
        print("srun: fatal: No command given to execute.", file=sys.stderr)
        return 1
    os.execvp(command[0], command)


COMMANDS = {"sbatch": sbatch, "sacct": sacct, "squeue": squeue, "sacctmgr": sacctmgr, "sinfo": sinfo,
            "scontrol": scontrol, "scancel": scancel, "srun": srun}


def main(name):
    sys.exit(COMMANDS[name](sys.argv[1:]))


if __name__ == "__main__" and sys.argv[1:2] == ["_run"]:
    sys.exit(run_job(int(sys.argv[2])))
