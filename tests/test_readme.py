"""The README's examples run exactly as written, from a fresh directory, as a user runs them.

Each test copies a section's code blocks out of README.md verbatim, runs the commands the
section gives as real processes, and reads what the README says they print.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .helpers import free_port, uvicorn

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The text of the README section `## title`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"no section {title!r} in README.md"
    return match.group(1)


def blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of one language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def commands(block: str) -> list[list[str]]:
    """A shell block's commands, comments dropped."""
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def resolve(argv: list[str]) -> list[str]:
    """`python` and `aiotasks` as installed next to the running interpreter."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "aiotasks":
        script = Path(sys.executable).parent / "aiotasks"
        found = str(script) if script.exists() else shutil.which("aiotasks")
        return [found, *argv[1:]] if found else [sys.executable, "-m", "aiotasks", *argv[1:]]
    return argv


def user_env(redis_url: str) -> dict[str, str]:
    """The environment of a user whose Redis is `redis_url`, importing this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "AIOTASKS_APP")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "AIOTASKS_REDIS_URL": redis_url, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def stop(proc: subprocess.Popen[Any], timeout: float = 20) -> int:
    """SIGTERM, then the exit code (SIGKILL if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


# -- In 20 lines ------------------------------------------------------------------------------


def test_in_20_lines_runs_as_written(own_server: Any, tmp_path: Path) -> None:
    text = section("In 20 lines")
    (code,) = blocks(text, "python")
    assert len(code.splitlines()) <= 20, "the section promises 20 lines"
    assert code.startswith("# tasks.py\n")
    (tmp_path / "tasks.py").write_text(code)
    (shell,) = blocks(text, "bash")
    run_worker, send = commands(shell)
    assert run_worker == ["aiotasks", "run", "tasks:tasks"] and send == ["python", "tasks.py"]

    env = user_env(own_server.url)
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        resolve(run_worker), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        sent = subprocess.run(
            resolve(send), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
        )
        output = (tmp_path / "worker.log").read_text()
        assert sent.returncode == 0, sent.stdout + sent.stderr + output
        assert sent.stdout == "5\n"
        assert stop(worker) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    output = (tmp_path / "worker.log").read_text()
    assert "tasks.add" in output  # the banner names the task as `python tasks.py` sent it
    assert "UnknownTask" not in output and "Traceback" not in output


# -- FastAPI ----------------------------------------------------------------------------------


def curl(line: str, port: int, task_id: str = "") -> tuple[str, str, Any]:
    """A README curl line as (method, url, the JSON its comment says it prints)."""
    command, _, comment = line.partition("#")
    argv = shlex.split(command)
    assert argv[0] == "curl"
    method = argv[argv.index("-X") + 1] if "-X" in argv else "GET"
    url = "http://" + argv[-1].replace("localhost:8000", f"127.0.0.1:{port}")
    return method, url.replace("<id>", task_id), json.loads(comment.strip() or "null")


def test_fastapi_section_runs_as_written(own_server: Any, tmp_path: Path) -> None:
    text = section("FastAPI")
    (code,) = blocks(text, "python")
    (tmp_path / "main.py").write_text(code)
    (shell,) = blocks(text, "bash")
    serve, post, get = shell.strip().splitlines()
    argv = shlex.split(serve)
    assert argv[:2] == ["uvicorn", "main:app"] and argv[2:] == ["--port", "8000"]
    port = free_port()  # not 8000: other programs on this machine may hold it
    with uvicorn(
        [*argv[1:-1], str(port)], tmp_path, user_env(own_server.url), tmp_path / "log"
    ) as s:
        method, url, said = curl(post, port)
        sent = s.client.request(method, url)
        assert sent.status_code == 200, sent.text
        task_id = sent.json()["id"]
        assert said == {"id": "<id>"} and list(sent.json()) == ["id"]
        method, url, said = curl(get, port, task_id)
        assert s.poll_until_final(url) == said == {"state": "SUCCESS", "result": 5}
        assert s.stop() in (0, -signal.SIGTERM), s.output()
    assert "Traceback" not in s.output()


# -- Testing your own tasks -------------------------------------------------------------------


def test_pytest_section_runs_as_written_in_strict_mode(redis_url: str, tmp_path: Path) -> None:
    (quick_start,) = blocks(section("In 20 lines"), "python")
    (tmp_path / "tasks.py").write_text(quick_start)
    text = section("Testing your own tasks")
    (code,) = blocks(text, "python")
    assert code.startswith("# test_tasks.py")
    (tmp_path / "test_tasks.py").write_text(code)
    (shell,) = blocks(text, "bash")
    (argv,) = commands(shell)
    assert argv == ["pytest", "test_tasks.py"]
    # A fresh directory: no pytest configuration, so pytest-asyncio is in strict mode.
    assert not any((tmp_path / f).exists() for f in ("pytest.ini", "pyproject.toml", "tox.ini"))
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=tmp_path,
        env=user_env(redis_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "mode=Mode.STRICT" in proc.stdout, proc.stdout
