"""What mypy sees in a user's code: `@app.task` keeps the function's types, options or not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = """
from aiotasks import App

app = App()

@app.task(max_retries=2)
async def add(x: int, y: int) -> int:
    return x + y

@app.task(name="resize", queue="high")
def resize(path: str) -> str:
    return path

@app.task
async def bare(x: int) -> int:
    return x

reveal_type(add)
reveal_type(resize)
reveal_type(bare)

async def use() -> None:
    h = await add.send(1, 2)
    reveal_type(h)
    reveal_type(await h.result())
    await add.send("a", 2)
"""


def test_task_decorator_with_options_keeps_the_return_type(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_CODE)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            "user.py",
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    revealed = [
        line.split("Revealed type is ")[1]
        for line in proc.stdout.splitlines()
        if "Revealed" in line
    ]
    assert revealed == [
        '"aiotasks.task.Task[[x: int, y: int], int]"',
        '"aiotasks.task.Task[[path: str], str]"',
        '"aiotasks.task.Task[[x: int], int]"',
        '"aiotasks.handle.TaskHandle[int]"',
        '"int"',
    ], proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'incompatible type "str"; expected "int"' in errors[0], proc.stdout
