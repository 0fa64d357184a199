"""Supervisor: `aiotasks run app:tasks --processes N` runs N worker processes, keeps them up.

Each child is `python -m aiotasks run ...` with the same arguments minus `--processes`
(and `--metrics-port P` becomes `P + i` for child i, so each serves its own metrics).

- A child that dies unexpectedly (a crash, SIGKILL, the OOM killer) is restarted after a
  short backoff that grows while it keeps dying quickly; each restart is logged.
- A child that exits 0 on its own (`--burst` found the queues empty) is not restarted;
  one that exits 2 (bad arguments: every restart would fail the same way) stops them all.
- SIGTERM/SIGINT is forwarded once to every child, which stops gracefully; a second one
  is forwarded again, and children exit at once (unfinished tasks are redelivered).

Children run in their own process group, so a Ctrl-C in the terminal reaches them once,
through the supervisor, rather than twice. On Linux they also get SIGTERM should the
supervisor itself die, so no worker outlives it unsupervised.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from .backoff import Backoff

log = logging.getLogger(__name__)

#: A child that ran at least this long (s) restarts without the grown backoff.
STABLE_AFTER = 10.0
#: How often (s) the supervisor looks at its children.
POLL_INTERVAL = 0.1
#: Exit code of a usage error (bad option, app that cannot be imported).
USAGE_ERROR = 2


def child_args(argv: Sequence[str], index: int) -> list[str]:
    """The arguments of child `index`: argv[1:] without --processes, metrics port shifted."""
    out: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        if arg == "--processes":
            next(args, None)
        elif arg.startswith("--processes="):
            continue
        elif arg == "--metrics-port":
            out += [arg, _shift(next(args, ""), index)]
        elif arg.startswith("--metrics-port="):
            out.append("--metrics-port=" + _shift(arg.partition("=")[2], index))
        else:
            out.append(arg)
    return out


def _shift(port: str, index: int) -> str:
    try:
        return str(int(port) + index)
    except ValueError:
        return port  # let the child's option parser report it


def _child_setup(parent: int) -> Callable[[], None] | None:
    """A preexec function asking Linux to SIGTERM the child when the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def setup() -> None:
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return setup


@dataclass
class Child:
    """One worker slot: its current process and its restart state."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    handled: bool = False  # its exit was seen and acted on
    sent: int = 0  # how many of the stop signals its current process was sent
    backoff: Backoff = field(default_factory=lambda: Backoff(start=0.5, cap=10.0))

    @property
    def alive(self) -> bool:
        """Whether its process is running."""
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Runs `processes` worker children of one command line until told to stop.

    Args:
        processes: how many children to keep running.
        argv: the supervisor's own command line (sys.argv), --processes included.
    """

    def __init__(self, processes: int, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.children = [Child(i) for i in range(processes)]
        self.stopping = False
        self.signals: list[int] = []
        self.exit_code = 0

    def command(self, index: int) -> list[str]:
        """The command line of child `index`."""
        return [sys.executable, "-m", "aiotasks", *child_args(self.argv, index)]

    def start(self, child: Child) -> None:
        """Start (or restart) a child's process."""
        child.proc = subprocess.Popen(
            self.command(child.index),
            process_group=0,
            preexec_fn=_child_setup(os.getpid()),
        )
        child.started = time.monotonic()
        child.restart_at = None
        child.handled = False
        child.sent = 0
        log.info("started worker process %d (pid %d)", child.index, child.proc.pid)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Record a stop signal: the main loop forwards it to every child (`_forward`);
        no more restarts."""
        self.stopping = True
        self.signals.append(signum)
        name = signal.Signals(signum).name
        again = "again " if len(self.signals) > 1 else ""
        log.warning("%s: stopping %sall worker processes", name, again)

    def _forward(self) -> None:
        """Send each child's process the stop signals it has not had yet. From the main
        loop, not the handler: a signal that comes while a child is being started (at
        startup, or a restart) would find its old process, and the new one would run on
        with the supervisor waiting for it; and none is sent twice (a second signal
        means "exit at once" to a worker)."""
        for child in self.children:
            if self.stopping:
                child.restart_at = None
            while child.sent < len(self.signals) and child.alive and child.proc is not None:
                child.proc.send_signal(self.signals[child.sent])
                child.sent += 1

    def run(self) -> int:
        """Start every child and supervise until all have stopped; the exit code."""
        previous = {
            sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for child in self.children:
                self.start(child)
            while not self._finished():
                self._forward()
                time.sleep(POLL_INTERVAL)
                self._forward()
                for child in self.children:
                    self._check(child)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def _finished(self) -> bool:
        return all((c.proc is None or c.handled) and c.restart_at is None for c in self.children)

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at and not self.stopping:
                self.start(child)
            return
        if child.proc is None or child.handled or child.proc.poll() is None:
            return
        child.handled = True
        self._exited(child, child.proc.returncode, now)

    def _exited(self, child: Child, code: int, now: float) -> None:
        pid = child.proc.pid if child.proc is not None else 0
        if self.stopping:
            # Killed by the very signal we forwarded: it had not started consuming yet.
            clean = code == 0 or -code in self.signals
            if not clean:
                log.warning(
                    "worker process %d (pid %d) stopped with code %d", child.index, pid, code
                )
                self.exit_code = 1
            return
        if code == 0:
            log.info("worker process %d (pid %d) finished", child.index, pid)
            return
        if code == USAGE_ERROR:
            log.error(
                "worker process %d (pid %d) exited with a usage error; stopping", child.index, pid
            )
            self.exit_code = USAGE_ERROR
            self.on_signal(signal.SIGTERM, None)
            return
        if now - child.started >= STABLE_AFTER:
            child.backoff.reset()
        delay = child.backoff.next()
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with code {code}"
        )
        log.warning(
            "worker process %d (pid %d) %s; restarting it in %.1f s", child.index, pid, how, delay
        )
        child.restart_at = now + delay


def supervise(processes: int, argv: Sequence[str]) -> int:
    """Run `processes` worker processes for this command line until SIGTERM/SIGINT.

    Args:
        processes: how many worker processes to keep running.
        argv: the command line (sys.argv); children get argv[1:] minus --processes.

    Returns:
        0 when every child stopped cleanly, 2 after a usage error, else 1.
    """
    return Supervisor(processes, argv).run()
