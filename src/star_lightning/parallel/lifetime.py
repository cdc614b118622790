"""A job's processes live and die together, from the first line of ``main`` to the last rank's exit.

- A rank that Lightning's launcher starts (a child of the launching process, which names itself in
  ``STAR_LIGHTNING_LAUNCHER_PID``) asks the kernel, at its first line, to be killed when its parent dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, Linux): no rank outlives its launcher, however the launcher ends (SIGKILL
  included), and none waits out a connect timeout to write a traceback into a terminal whose command has ended.
- Outside the predict loop (parsing, the checks, starting and connecting the ranks, loading weights; the teardown),
  SIGTERM, SIGUSR1 and SIGINT stop the job at once: the launching process kills its ranks, says so in one line and
  exits ``128 + N`` (130 for Ctrl-C; SIGUSR1 requeues a SLURM job first); a rank passes the signal on to its
  launcher. A watcher thread acts, woken through ``signal.set_wakeup_fd``, because the main thread may sit inside a
  C++ call for seconds or minutes (a rendezvous waiting for ranks still importing), where no Python handler runs.
- A rank killed by a signal (``kill -9``, the OOM killer, a crash) ends the job at once, at any time: the launcher
  learns it from SIGCHLD, names the rank in one line, kills the others and exits 1 -- before its collectives fail
  into tracebacks, and before Lightning's own observer (which looks every 5 s) would SIGKILL it without a word.
- Inside the predict loop the writer's handlers own these signals (stop after the current request, agreed by every
  rank: :mod:`star_lightning.callbacks.prediction_writer`); it says so with :func:`predict_loop_started` /
  :func:`predict_loop_ended`, and the watcher leaves the signals to it.

Signal handlers and the wakeup descriptor are process-wide, so the watcher is too: one per process, found by the
writer through :func:`predict_loop_started`, installed and removed by :func:`job_lifetime` around a command.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

LAUNCHER_PID = "STAR_LIGHTNING_LAUNCHER_PID"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1
_STOP_WATCHING = b"\0"  # no signal has number 0


class Stopped(BaseException):
    """Raised in the main thread of a command without ranks (``plan``, ``generate``, ...) on SIGTERM, so its
    cleanups run (a half-written file is removed) before it exits ``128 + N``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def tie_to_launcher() -> int | None:
    """In a rank the launching process started: be killed when it dies. Returns the launcher's pid (None in any
    other process). A rank whose launcher died before this line ran exits at once."""
    named = os.environ.get(LAUNCHER_PID, "")
    if not named.isdigit() or int(named) == os.getpid() or os.environ.get("LOCAL_RANK", "0") == "0":
        return None  # not a rank Lightning's launcher started (it sets LOCAL_RANK 1, 2, ... in the ranks it starts)
    launcher = int(named)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == launcher:
        return launcher
    try:
        os.kill(launcher, 0)
    except ProcessLookupError:
        os._exit(128 + signal.SIGKILL)  # the launcher died before the kernel could be told: as it would have
    except PermissionError:
        pass
    return None  # the variable came with the environment of a process that is not this one's parent


def requeue_slurm_job() -> str:
    """``; requeued SLURM job J`` (or why not) when this process is in a SLURM job, else ``""``: the time-limit
    warning (SIGUSR1) puts the job back in the queue, and the requeued job resumes from its output."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return ""
    if os.environ.get("SLURM_ARRAY_TASK_ID") and os.environ.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    except OSError as error:
        return f"; requeueing SLURM job {job_id} failed ({error.strerror}): submit it with --requeue"
    if result.returncode == 0:
        return f"; requeued SLURM job {job_id}"
    return f"; requeueing SLURM job {job_id} failed ({result.stderr.strip()}): submit it with --requeue"


def _global_rank() -> int:
    """This process's rank as its launcher gave it (torchrun, SLURM); 0 where no launcher named one."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


class _Watcher:
    """Stops the job on a stop signal outside the predict loop, or when a launched rank is killed, from a thread
    (see the module docstring); the first of the thread and the Python-level handler to act does it."""

    def __init__(self, command: str, launcher: int | None) -> None:
        self._command = command
        self._launcher = launcher  # set in a rank: the signal goes to it
        self._speaks = launcher is None and _global_rank() == 0
        self._in_loop = False
        self.ranks: Callable[[], list[tuple[int, int]]] = list  # (rank, pid) of the ranks this process launched
        self._stopping = threading.Lock()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        watched = (*STOP_SIGNALS, signal.SIGCHLD) if launcher is None else STOP_SIGNALS
        self._previous = {signum: signal.signal(signum, self._handle) for signum in watched}
        self._thread = threading.Thread(target=self._watch, name="star-lightning-stop-signals", daemon=True)
        self._thread.start()

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.write(self._write, _STOP_WATCHING)
        self._thread.join(timeout=5)
        os.close(self._read)
        os.close(self._write)

    @property
    def launcher(self) -> int | None:
        return self._launcher

    def predict_loop(self, running: bool) -> None:
        self._in_loop = running

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler (needed for the wakeup byte); it acts too, should it run before the thread."""
        self._act(signum)

    def _watch(self) -> None:
        while True:
            data = os.read(self._read, 64)
            for signum in data:
                if signum == 0:
                    return
                self._act(signum)

    def _act(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self._check_ranks()
        elif signum in STOP_SIGNALS and not self._in_loop:
            self._stop(signum)

    def kill_ranks(self) -> None:
        for _, pid in self.ranks():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _check_ranks(self) -> None:
        """A launched rank killed by a signal ends the job (looked at without reaping it: its Popen does that)."""
        for rank, pid in self.ranks():
            try:
                ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if ended is not None and ended.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
                name = signal.Signals(ended.si_status).name
                self._end(1, f"rank {rank} (pid {pid}) ended (killed by {name}), so the job stops; {_KEPT}")

    def _stop(self, signum: int) -> None:
        if self._launcher is not None:
            if self._stopping.acquire(blocking=False):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(self._launcher, signum)  # the launcher stops the job (and this rank with it)
                os._exit(128 + signum)
            return
        if self._stopping.acquire(blocking=False):
            requeued = requeue_slurm_job() if signum == signal.SIGUSR1 and self._speaks else ""
            self._finish(128 + signum, f"stopped by {signal_name(signum)}{requeued}; {_KEPT}")

    def _end(self, status: int, message: str) -> None:
        if self._stopping.acquire(blocking=False):
            self._finish(status, message)

    def _finish(self, status: int, message: str) -> None:
        """Kill the launched ranks first (before this process's sockets close under them), say it once, exit."""
        self.kill_ranks()
        if self._speaks:
            with contextlib.suppress(OSError):
                os.write(sys.stderr.fileno(), f"star-lightning {self._command}: {message}\n".encode())
        os._exit(status)


_KEPT = "what --output holds is kept: rerun the same command to resume"


_watcher: _Watcher | None = None


def watch_ranks(ranks: Callable[[], list[tuple[int, int]]]) -> None:
    """Tell the job's lifetime how to find the ranks this process launches: ``(global rank, pid)`` pairs, asked for
    whenever they must be looked at or killed (the launcher starts them later)."""
    if _watcher is not None:
        _watcher.ranks = ranks


def kill_launched_ranks() -> None:
    """SIGKILL the ranks this process launched, before its own sockets close under them."""
    if _watcher is not None:
        _watcher.kill_ranks()


def launcher_pid() -> int | None:
    """The pid of the launching process where this process is a rank it started (tied to it), else None."""
    return None if _watcher is None else _watcher.launcher


def predict_loop_started() -> None:
    """The predict loop's own handlers are installed: the stop signals are theirs until :func:`predict_loop_ended`."""
    if _watcher is not None:
        _watcher.predict_loop(True)


def predict_loop_ended() -> None:
    if _watcher is not None:
        _watcher.predict_loop(False)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def job_lifetime(command: str) -> Iterator[None]:
    """Around a whole command: ``predict`` gets the watcher (and a rank its tie to the launcher); another command
    turns SIGTERM into :class:`Stopped`. Everything is restored on the way out (``main`` may run in a test)."""
    global _watcher
    in_main_thread = threading.current_thread() is threading.main_thread()
    if command != "predict" or not in_main_thread or _watcher is not None:
        previous = signal.signal(signal.SIGTERM, _raise_stopped) if in_main_thread else None
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return
    launcher = tie_to_launcher()
    advertised = os.environ.get(LAUNCHER_PID)
    if launcher is None:
        os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks Lightning starts inherit it: they tie to this process
    _watcher = _Watcher(command, launcher)
    try:
        yield
    finally:
        _watcher.close()
        _watcher = None
        if launcher is None:
            if advertised is None:
                os.environ.pop(LAUNCHER_PID, None)
            else:
                os.environ[LAUNCHER_PID] = advertised


# What gloo and NCCL say when a peer is gone or silent (their errors are RuntimeErrors, not always DistErrors).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out")


def lost_peer(error: BaseException) -> str | None:
    """The first line of a collective's error that means another rank ended or hung (its echo here), else None."""
    import torch.distributed as dist

    text = str(error).strip()
    if not (
        isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(p in text for p in _PEER_GONE))
    ):
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    return first.split("] ", 1)[-1] if first.startswith("[") else first  # without gloo's source location
