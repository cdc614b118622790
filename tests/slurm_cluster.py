"""A real single-node SLURM cluster for the tests, and helpers to run ``star-lightning predict`` as real processes.

``slurm_cluster`` (session fixture) installs nothing: it needs Debian's ``slurmctld``, ``slurmd``, ``slurm-client``
and ``munge`` packages (``apt-get install -y slurmctld slurmd slurm-client munge``) and root. It writes a one-node
configuration (``select/cons_tres``, ``proctrack/linuxproc``, ``task/none``, no accounting) into a temporary
folder, starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground-less daemon mode with that file
(``SLURM_CONF``), waits until the node is idle, and stops the daemons it started (by their pids) at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON_BIN = Path(sys.executable).parent
STAR_LIGHTNING = PYTHON_BIN / "star-lightning"


def write_requests(path: Path, count: int, *, filler: int = 30) -> Path:
    """``count`` small requests with indices 0..count-1 (the same magic-number task, each its own number)."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            context = "The grass is green. The sky is blue. " * filler + f"The magic number is {i}. "
            row = {"input_context": context, "input_query": "What is the magic number?", "outputs": [str(i)]}
            handle.write(json.dumps(row) + "\n")
    return path


def predict_args(model_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--model.pretrained",
        str(model_dir),
        "--model.block_size",
        "64",
        "--model.max_new_tokens",
        "8",
        "--data.path",
        str(data),
        "--output",
        str(output),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


# What an in-process run of the CLI leaves in this process's environment (Lightning sets them): a fresh job must not
# inherit them (its rendezvous would reuse a port still in use here).
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def copy_finished(finished: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of the ``finished`` fixture's run (requests, output, run record) in ``folder``: (requests, output)."""
    for name in ("requests.jsonl", "out.jsonl", "out.jsonl.run.json"):
        shutil.copy(finished / name, folder / name)
    return folder / "requests.jsonl", folder / "out.jsonl"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: one thread per rank (CI has 2 cores), no SLURM or launch variables
    leaking in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "SBATCH_", "PL_")) and key not in _LAUNCH_VARS
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``star-lightning ARGS`` as its own process, to the end."""
    return subprocess.run(
        [str(STAR_LIGHTNING), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=240, check=False
    )


def run_all(jobs: list[tuple[list[str], Path]]) -> list[subprocess.CompletedProcess[str]]:
    """Several ``(args, cwd)`` CLI processes at once (each spends seconds importing; CI has 2 cores)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda job: run_cli(*job), jobs))


def assert_one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2 and exactly one line on stderr: the command's error, naming the problem (``words``)."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("star-lightning predict: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def read_indices(path: Path) -> list[int]:
    """Request indices of the complete lines of a predictions file, in file order (duplicates kept)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [json.loads(line)["index"] for line in lines if line.endswith("\n")]


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(read_indices(path)) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc={process.returncode}) before writing {count} lines")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} lines within {timeout_s} s")


# ---------------------------------------------------------------------------------------------------------------
# The SLURM cluster


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path
    workdir: Path
    cpus: int

    def env(self, **extra: str) -> dict[str, str]:
        return cli_env(SLURM_CONF=str(self.conf), PATH=f"{PYTHON_BIN}:{os.environ.get('PATH', '')}", **extra)

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=False)


_SLURM_CONF = """\
ClusterName=starci
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
SlurmdParameters=config_overrides
NodeName={node} NodeHostname={node} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=ci Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _why_slurm_cannot_start() -> str | None:
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root (CI runs as root)"
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey") if shutil.which(tool) is None]
    if shutil.which("mungekey") is None and shutil.which("create-munge-key") is not None:
        missing.remove("mungekey")
    if missing:
        return f"missing {', '.join(missing)}: apt-get install -y slurmctld slurmd slurm-client munge"
    return None


def _start_munge(state: Path) -> subprocess.Popen | None:
    """Start munged unless one already answers; returns the process we started (to stop it), else None."""
    if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True, check=False).returncode == 0:
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        if shutil.which("mungekey"):
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        else:
            subprocess.run(["create-munge-key", "-f"], check=True, capture_output=True)
    key.chmod(0o600)
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["munged", "--foreground", "--force", f"--key-file={key}", "--num-threads=2"],
        stdout=subprocess.DEVNULL,
        stderr=(state / "munged.log").open("w"),
    )
    for _ in range(100):
        if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True, check=False).returncode == 0:
            return process
        time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"munged did not start; see {state / 'munged.log'}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = _why_slurm_cannot_start()
    if reason is not None:
        pytest.skip(f"no SLURM cluster: {reason}")
    state = tmp_path_factory.mktemp("slurm")
    for folder in ("ctld", "d"):
        (state / folder).mkdir()
    node = socket.gethostname().split(".")[0]
    cpus = 4  # more slots than cores: the 2x2 job needs 4 tasks on a 2-core CI machine (OverSubscribe)
    conf = state / "slurm.conf"
    conf.write_text(
        _SLURM_CONF.format(host=node, node=node, cpus=cpus, state=state, ctld_port=_free_port(), d_port=_free_port())
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[subprocess.Popen] = []
    munge = _start_munge(state)
    if munge is not None:
        started.append(munge)
    try:
        for daemon in ("slurmctld", "slurmd"):
            started.append(
                subprocess.Popen(
                    [daemon, "-D", "-f", str(conf)] + (["-i"] if daemon == "slurmctld" else []),
                    env=env,
                    stdout=(state / f"{daemon}.out").open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
        cluster = SlurmCluster(conf=conf, workdir=state, cpus=cpus)
        deadline = time.monotonic() + 60
        status = ""
        while time.monotonic() < deadline:
            status = cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip()
            if status in ("idle", "mixed"):
                break
            for process in started:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited (rc={process.returncode}); logs in {state}")
            time.sleep(0.25)
        else:
            raise RuntimeError(f"the SLURM node did not become idle within 60 s (state {status!r}); logs in {state}")
        yield cluster
    finally:
        for process in reversed(started):
            _stop(process)
