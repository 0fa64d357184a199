"""Tables and key/value blocks, drawn for a terminal or written plain for a pipe.

A command builds `Table`, `Fields` and `Line` blocks once. On a terminal (as rich decides:
a tty, or TTY_COMPATIBLE=1 / FORCE_COLOR) they are drawn to fit its width without breaking
a word: a table whose words cannot all fit becomes one key/value block per row, and only a
single word wider than the screen is folded. Anywhere else the output is plain and
complete: one row per line, columns separated by at least two spaces, no box drawing, no
truncation, no trailing spaces, so `aiotasks status | grep myqueue` finds its row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console, JustifyMethod, RenderableType
    from rich.text import Text

# rich is imported inside the functions that draw: `aiotasks run` never draws.

#: A cell: its text, or (text, rich style) for a terminal.
Cell = str | tuple[str, str]


@dataclass(frozen=True, slots=True)
class Table:
    """Rows under headers; `right` holds the indexes of right-aligned (numeric) columns."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    right: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Fields:
    """Key/value pairs, one per line."""

    pairs: Sequence[tuple[str, Cell]]


@dataclass(frozen=True, slots=True)
class Line:
    """Text printed as it is (several lines allowed), dimmed or coloured on a terminal."""

    text: str
    style: str = ""


Block = Table | Fields | Line


def console() -> Console:
    """A console on the current stdout (made per call: tests swap stdout)."""
    from rich.console import Console

    return Console(highlight=False)


def show(blocks: Sequence[Block]) -> None:
    """Draw the blocks on a terminal, or write them plain."""
    con = console()
    if con.is_terminal:
        con.print(render(blocks, con.width))
    else:
        typer.echo(plain(blocks))


def echo_json(value: Any) -> None:
    """Print one JSON document."""
    typer.echo(json.dumps(value, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    return repr(obj)


# -- plain --------------------------------------------------------------------------------


def plain(blocks: Sequence[Block]) -> str:
    """The blocks as plain lines: a blank line before each table or field block."""
    lines: list[str] = []
    for block in blocks:
        if lines and not isinstance(block, Line):
            lines.append("")
        if isinstance(block, Table):
            lines += _plain_table(block)
        elif isinstance(block, Fields):
            lines += _plain_fields(block)
        else:
            lines += [line.rstrip() for line in block.text.splitlines()]
    return "\n".join(lines)


def _plain_table(table: Table) -> list[str]:
    from rich.cells import cell_len

    rows = [list(table.headers), *([_one_line(text(c)) for c in row] for row in table.rows)]
    widths = [max(cell_len(row[i]) for row in rows) for i in range(len(table.headers))]
    lines = [table.title]
    for row in rows:
        cells = [
            _pad(cell, width, i in table.right)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _plain_fields(block: Fields) -> list[str]:
    width = max((len(key) for key, _ in block.pairs), default=0)
    return [f"{key:<{width}}  {_one_line(text(value))}".rstrip() for key, value in block.pairs]


def _pad(cell: str, width: int, right: bool) -> str:
    from rich.cells import cell_len

    gap = " " * (width - cell_len(cell))
    return gap + cell if right else cell + gap


def _one_line(cell: str) -> str:
    """A cell on one line; an empty cell as "-" so that columns stay countable."""
    return " ".join(cell.split()) or "-"


def text(cell: Cell) -> str:
    """The text of a cell."""
    return cell if isinstance(cell, str) else cell[0]


# -- terminal -----------------------------------------------------------------------------


def render(blocks: Sequence[Block], width: int) -> RenderableType:
    """The blocks as one rich renderable fitting `width` columns."""
    from rich.console import Group

    parts: list[RenderableType] = []
    for block in blocks:
        if parts and not isinstance(block, Line):
            parts.append("")
        if isinstance(block, Table):
            parts.append(_rich_table(block, width))
        elif isinstance(block, Fields):
            parts.append(_rich_fields(block, width))
        else:
            parts.append(_rich_text((block.text.rstrip(), block.style)))
    return Group(*parts)


def _rich_table(table: Table, width: int) -> RenderableType:
    from rich.table import Table as RichTable

    columns = [[h, *(text(row[i]) for row in table.rows)] for i, h in enumerate(table.headers)]
    gaps = 2 * (len(columns) - 1)  # one space of padding on each side of a column boundary
    widths = fit_widths(
        [max(_width(c) for c in column) for column in columns],
        [max(_longest_word(c) for c in column) for column in columns],
        width - gaps,
    )
    if widths is None:  # its words cannot all fit side by side: one block per row
        return _records(table, width)
    out = RichTable(
        title=table.title,
        title_justify="left",
        box=None,
        padding=(0, 1),
        pad_edge=False,
        header_style="bold",
        title_style="bold",
    )
    for i, header in enumerate(table.headers):
        justify: JustifyMethod = "right" if i in table.right else "left"
        out.add_column(header, justify=justify, width=widths[i], overflow="fold")
    for row in table.rows:
        out.add_row(*(_rich_text(cell) for cell in row))
    return out


def fit_widths(natural: Sequence[int], minimal: Sequence[int], room: int) -> list[int] | None:
    """Column widths within `room`, none below its longest word; None if that cannot be.

    Columns keep their natural width when all fit. Otherwise the widest are narrowed to a
    common cap (never below their longest word), so short columns stay whole and the long
    ones wrap.
    """
    if sum(natural) <= room:
        return list(natural)
    if sum(minimal) > room:
        return None

    def capped(cap: int) -> list[int]:
        return [max(m, min(n, cap)) for n, m in zip(natural, minimal, strict=True)]

    low, high = 0, max(natural)  # the widest cap that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if sum(capped(mid)) <= room else (low, mid - 1)
    return capped(low)


def _records(table: Table, width: int) -> RenderableType:
    from rich.console import Group

    parts: list[RenderableType] = [_rich_text((table.title, "bold"))]
    for row in table.rows:
        parts.append("")
        parts.append(_rich_fields(Fields(list(zip(table.headers, row, strict=True))), width))
    return Group(*parts)


def _rich_fields(block: Fields, width: int) -> RenderableType:
    """Keys and values side by side; a value with a word too long for that goes below its
    key, at the full width."""
    from rich.cells import cell_len
    from rich.console import Group
    from rich.table import Table as RichTable

    key_width = max((cell_len(key) for key, _ in block.pairs), default=0)
    room = width - key_width - 2
    parts: list[RenderableType] = []
    grid: RichTable | None = None
    for key, value in block.pairs:
        if _longest_word(text(value)) > room:
            parts += [_rich_text((key, "bold")), _rich_text(value)]
            grid = None
            continue
        if grid is None:
            grid = RichTable.grid(padding=(0, 2))
            grid.add_column(style="bold", no_wrap=True, width=key_width)
            grid.add_column(overflow="fold")
            parts.append(grid)
        grid.add_row(key, _rich_text(value))
    return Group(*parts)


def _rich_text(cell: Cell) -> Text:
    from rich.text import Text

    return Text(cell) if isinstance(cell, str) else Text(cell[0], style=cell[1])


def _width(cell: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in cell.splitlines()), default=0)


def _longest_word(cell: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(word) for word in cell.split()), default=0)


# -- times --------------------------------------------------------------------------------


def ago(when: datetime | None) -> str:
    """'12s ago', 'in 3m', or '-' for no time."""
    if when is None:
        return "-"
    secs = (datetime.now(UTC) - when).total_seconds()
    if secs < 0:
        return f"in {_span(-secs)}"
    return f"{_span(secs)} ago"


def _span(secs: float) -> str:
    if secs < 90:
        return f"{secs:.0f}s"
    if secs < 5400:
        return f"{secs / 60:.0f}m"
    if secs < 172_800:
        return f"{secs / 3600:.1f}h"
    return f"{secs / 86400:.1f}d"
