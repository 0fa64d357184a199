"""A task defined in a script is named as a worker importing that file names it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TASKS = """
from aiotasks import App

tasks = App()

@tasks.task
async def add(x: int, y: int) -> int:
    return x + y

print(add.name)
"""

RUN_PATH = "import runpy; runpy.run_path('proj/tasks.py', run_name='__main__')"


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["proj/tasks.py"], "tasks.add"),  # the script's directory is sys.path[0]
        (["-m", "proj.tasks"], "proj.tasks.add"),
        (["-c", RUN_PATH], "proj.tasks.add"),  # importable as proj.tasks from sys.path[0]
        (["-c", "exec(open('proj/tasks.py').read())"], "__main__.add"),  # no file: no module
    ],
)
def test_main_module_is_named_by_its_import_name(
    tmp_path: Path, argv: list[str], name: str
) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "__init__.py").write_text("")
    (tmp_path / "proj" / "tasks.py").write_text(TASKS)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{name}\n"
