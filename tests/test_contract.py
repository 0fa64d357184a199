"""The Python/Lua contract: one definition of keys and fields, nothing positional."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import pytest
import redis

from aiotasks import contract
from aiotasks.keys import LAYOUT, Keys, _parts

LUA_DIR = resources.files("aiotasks") / "lua"
SAMPLE = {
    "queue": "mail",
    "priority": 7,
    "id": "abc123",
    "client": "c0ffee",
    "name": "w-1",
    "tick": 1700000000000,
    "key": "mail.send:42",
}


def test_generated_lua_contract_is_current() -> None:
    on_disk = (LUA_DIR / "_contract.lua").read_text()
    assert on_disk == contract.lua_source(), (
        "lua/_contract.lua is stale: python -m aiotasks.contract --write"
    )


def test_python_and_lua_build_the_same_key_names(redis_url: str) -> None:
    keys = Keys("ns-{odd}:x")
    calls = []
    expected = []
    for kind, template in LAYOUT.items():
        parts = _parts(template)
        args = ", ".join(repr(str(SAMPLE[p])) for p in parts)
        calls.append(f"K.{kind}({args})")
        method = getattr(Keys, kind)
        if isinstance(method, property):
            expected.append(getattr(keys, kind))
        else:
            expected.append(method(keys, *(SAMPLE[p] for p in parts)))
    # begin() (_lib.lua) sets P as every call starts.
    source = contract.lua_source() + "P = KEYS[1]\n" + "return {" + ", ".join(calls) + "}"
    r = redis.Redis.from_url(redis_url)
    try:
        got = r.eval(source, 1, keys.prefix)
    finally:
        r.close()
    assert [g.decode() for g in got] == expected
    assert len(expected) == len(LAYOUT)


def _lua_files() -> list[str]:
    return sorted(p.name for p in LUA_DIR.iterdir() if p.name.endswith(".lua"))


@pytest.mark.parametrize("filename", [f for f in _lua_files() if not f.startswith("_")])
def test_script_arguments_are_read_only_into_named_locals(filename: str) -> None:
    """The first statement is begin(KEYS) (the prefix and the call's state, _lib.lua);
    ARGV is copied into named locals at the top; after that no ARGV[n] appears, and
    KEYS appears only as KEYS[k] in loops over declared streams."""
    body = [
        line
        for line in (LUA_DIR / filename).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("--")
    ]
    assert body[0] == "begin(KEYS)", f"{filename} does not start with begin(KEYS)"
    head = 1
    while head < len(body) and re.match(r"^local \w+ = .*(ARGV|KEYS)\[\d+\]", body[head]):
        head += 1
    rest = "\n".join(body[head:])
    assert not re.search(r"ARGV\[", rest), f"{filename} reads ARGV after its header locals"
    assert not re.search(r"KEYS\[\d", rest), f"{filename} reads KEYS by number in its body"


def test_records_travel_as_named_maps() -> None:
    """What Python sends to Lua is a map with named fields, never a positional array (but
    the done op, below)."""
    rec = contract.TaskRecord(
        id="x",
        name="n",
        queue="q",
        priority=5,
        m=b"m",
        ct="msgpack",
        ttl=60,
        chord_id="c",
        chord_idx=0,
        tail="t",
        reply="r",
        exp_ms=1,
        due_ms=2,
        retries=1,
    )
    ops: list[dict[str, Any]] = [
        contract.enqueue_op(contract.SEND, rec),
        contract.ack_op("s", b"1-0"),
        contract.dead_op("s", b"1-0", "x", "q", "DecodeError", "bad", 60, {b"id": b"x"}),
        contract.chord_op("c", 60, 2, rec, rec),
        contract.entry_ref("s", b"1-0"),
    ]
    for op in ops:
        assert isinstance(op, dict) and all(isinstance(k, str) for k in op)
    wire = rec.wire()
    assert wire["v"] == contract.PROTOCOL
    # Every entry field comes from the record, but `err` (Lua adds it to an errback)
    # and `sig` (only with a signing key).
    assert set(contract.ENTRY_FIELDS) - {"err", "sig"} <= set(wire)


def test_a_done_op_travels_flat_in_the_order_finish_lua_reads_it() -> None:
    """The one positional op, for the hot path (a map per done op cost Redis a sixth of a
    finish call): done_op's flat form lines up with the names finish.lua unpacks it into,
    then the fields' count and the fields."""
    op = contract.done_op(
        "s",
        b"1-0",
        "x",
        "FAILURE",
        60,
        {"exc_type": "E", "traceback": None},
        ignore_result=True,
        linked=True,
        chord=("c", 0),
        tail="t",
        chord_value=b"v",
        slot={"key": "k"},
    )
    src = (LUA_DIR / "finish.lua").read_text()
    found = re.search(r"local (stream, [\w, ]+) =\s*unpack\(ops, i, i \+ (\d+)\)", src)
    assert found is not None
    lead = [name.strip() for name in found.group(1).split(",")]
    assert len(lead) == int(found.group(2)) + 1 == 12
    assert dict(zip(lead, op, strict=False)) == {
        "stream": "s",
        "entry": b"1-0",
        "id": "x",
        "state": "FAILURE",
        "ttl": 60,
        "flags": 3,
        "cid": "c",
        "cix": 0,
        "tail": "t",
        "value": b"v",
        "slot": {"key": "k"},
        "n": 2,
    }
    assert op[12:] == ("exc_type", "E")
    bare = contract.done_op("s", b"1-0", "x", "SUCCESS", 60, ["result", b"\xc0"])
    assert bare[5:12] == (0, False, False, False, False, False, 2)
    ack = contract.ack_op("s", b"1-0")
    assert contract.wire_ops([ack, bare]) == [ack, *bare]
