"""Reloader: `aiotasks run app:tasks --reload` restarts the worker when its source changes.

The reloader runs the same command line without `--reload` as a child process and
watches for changed Python files (watchfiles) under the current directory, and under the
app's top-level package when it lives elsewhere. On a change it stops the child as a
deploy would (SIGTERM, then it waits for the worker's graceful shutdown) and starts a
new one, which imports the new code. A child that exits by itself (an edit that does
not import) is started again at the next change. SIGTERM/SIGINT stop the child the same
way and end the reloader; a second one is forwarded too, and the worker exits at once.

The child runs in its own process group, so a Ctrl-C reaches it once, through here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from .supervisor import _child_setup

log = logging.getLogger(__name__)

#: Seconds a child gets beyond its --shutdown-timeout before it is killed.
STOP_GRACE = 5.0


def child_args(argv: Sequence[str]) -> list[str]:
    """The child's arguments: argv[1:] without --reload."""
    return [a for a in argv[1:] if a != "--reload"]


def watch_paths(app_spec: str) -> list[Path]:
    """The current directory, plus the app's top-level package or module when it is
    not under it (a package installed elsewhere, a path on PYTHONPATH)."""
    cwd = Path.cwd()
    top = app_spec.partition(":")[0].partition(".")[0]
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: nothing is executed
    except (ImportError, ValueError):
        spec = None
    paths = [cwd]
    if spec is not None and spec.origin:
        locations = spec.submodule_search_locations
        root = Path(locations[0]) if locations else Path(spec.origin).parent
        if not root.resolve().is_relative_to(cwd.resolve()):
            paths.append(root)
    return paths


class Reloader:
    """Runs one worker child of a command line and restarts it on source changes.

    Args:
        argv: the command line (sys.argv), --reload included.
        paths: directories to watch.
        stop_timeout: seconds a stopping child gets before it is killed.
    """

    def __init__(self, argv: Sequence[str], paths: Sequence[Path], stop_timeout: float) -> None:
        self.command = [sys.executable, "-m", "aiotasks", *child_args(argv)]
        self.paths = list(paths)
        self.stop_timeout = stop_timeout
        self.stopping = threading.Event()
        self.signals: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_seen = False

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; 0 when the last child stopped cleanly, else 1."""
        from watchfiles import PythonFilter, watch

        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.warning("reloading on changes to *.py under %s", ", ".join(map(str, self.paths)))
            self.start()
            for changes in watch(
                *self.paths,
                watch_filter=PythonFilter(),
                stop_event=self.stopping,
                rust_timeout=500,
                yield_on_timeout=True,  # wake every 0.5 s to see whether the child exited
                raise_interrupt=False,
            ):
                if changes and not self.stopping.is_set():
                    self.restart(sorted({path for _, path in changes}))
                self.check()
            return self.finish()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Forward a stop signal to the child and stop watching."""
        self.signals.append(signum)
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def start(self) -> None:
        """Start a worker child."""
        self.proc = subprocess.Popen(
            self.command, process_group=0, preexec_fn=_child_setup(os.getpid())
        )
        self.exit_seen = False
        log.info("started worker process %d", self.proc.pid)

    def restart(self, changed: list[str]) -> None:
        """Stop the child gracefully, then start a new one."""
        shown = ", ".join(os.path.relpath(p) for p in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        log.warning("%s%s changed: restarting the worker", shown, more)
        self.stop_child()
        if not self.stopping.is_set():
            self.start()

    def stop_child(self) -> None:
        """SIGTERM the child and wait for its graceful shutdown (SIGKILL after the limit)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker process %d did not stop in time; killing it", proc.pid)
            proc.kill()
            proc.wait()

    def check(self) -> None:
        """Say once when the child exited by itself; the next change starts a new one."""
        proc = self.proc
        if proc is None or self.exit_seen or proc.poll() is None or self.stopping.is_set():
            return
        self.exit_seen = True
        log.warning(
            "worker process %d exited with code %d; waiting for a change to start it again",
            proc.pid,
            proc.returncode,
        )

    def finish(self) -> int:
        """Wait for the child the forwarded signal is stopping; the exit code."""
        if self.proc is None:
            return 0
        code = self.proc.wait()
        return 0 if code == 0 or -code in self.signals or self.exit_seen else 1


def reload(argv: Sequence[str], app_spec: str, shutdown_timeout: float) -> int:
    """Run the command line `argv` minus --reload, restarting it on source changes.

    Returns:
        0 when the worker stopped cleanly at the end, else 1.
    """
    paths = watch_paths(app_spec)
    return Reloader(argv, paths, shutdown_timeout + STOP_GRACE).run()
