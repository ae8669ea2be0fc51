"""Generate the hostile/broken input corpus under tests/data/bad_inputs/ (deterministic).

Run: `.venv/bin/python tests/data/make_bad_inputs.py [OUT_DIR]`. Every file is small enough
to commit (the 10 MB prompts are compressed to a few KB); the 100 MB JSONL line is generated
by the test that needs it, in a temporary directory. `tests/test_producer_bad_inputs.py` holds
the expected error of every file; adding a file here without an expectation there fails it.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
TEN_MB = 10 * 2**20


def _parquet(table: pa.Table, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", **kwargs)
    return buffer.getvalue()


def _good_parquet(n: int = 20) -> bytes:
    return _parquet(
        pa.table({"id": [f"row-{i}" for i in range(n)], "prompt": [f"p{i}" for i in range(n)]}),
        row_group_size=5,
    )


def _lines(*objects: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _openai(custom_id: str, body: object) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _table(ids: list[object], prompts: list[object], **types: pa.DataType) -> pa.Table:
    return pa.table(
        {"id": pa.array(ids, types.get("id")), "prompt": pa.array(prompts, types.get("prompt"))}
    )


GOOD = {"id": "a", "prompt": "fine"}

CASES: dict[str, Callable[[], bytes]] = {
    # ---- Parquet: unreadable files
    "truncated.parquet": lambda: _good_parquet()[: len(_good_parquet()) // 2],
    "corrupt_footer.parquet": lambda: _good_parquet()[:-12] + b"\xde\xad\xbe\xef" * 2 + b"PAR1",
    "not_parquet.parquet": lambda: b"id,prompt\n1,hello\n",
    "empty.parquet": lambda: b"",
    "zero_rows.parquet": lambda: _parquet(_table([], [], id=pa.string(), prompt=pa.string())),
    # ---- Parquet: schema problems
    "missing_prompt_column.parquet": lambda: _parquet(pa.table({"id": ["a"], "text": ["hi"]})),
    "missing_id_column.parquet": lambda: _parquet(pa.table({"prompt": ["hi"]})),
    "prompt_int.parquet": lambda: _parquet(_table(["a", "b"], [1, 2])),
    "prompt_list.parquet": lambda: _parquet(_table(["a"], [["nested", "list"]])),
    "prompt_struct.parquet": lambda: _parquet(_table(["a"], [{"text": "hi"}])),
    "id_float.parquet": lambda: _parquet(_table([1.5, 2.5], ["x", "y"])),
    # ---- Parquet: bad rows
    "null_prompt.parquet": lambda: _parquet(_table(["a", "b", "c"], ["x", "y", None])),
    "empty_prompt.parquet": lambda: _parquet(_table(["a", "b"], ["x", ""])),
    "whitespace_prompt.parquet": lambda: _parquet(_table(["a", "b"], ["x", " \n\t "])),
    "duplicate_ids.parquet": lambda: _parquet(_table(["a", "b", "c", "b"], ["1", "2", "3", "4"])),
    "null_id.parquet": lambda: _parquet(_table(["a", None], ["x", "y"], id=pa.string())),
    "control_char_id.parquet": lambda: _parquet(_table(["ok", "bad\x00id"], ["x", "y"])),
    "long_id.parquet": lambda: _parquet(_table(["a", "x" * 600], ["x", "y"])),
    "huge_prompt.parquet": lambda: _parquet(_table(["a", "big"], ["x", "a" * TEN_MB])),
    "mixed_valid_invalid.parquet": lambda: _parquet(
        _table(
            ["r0", "r1", "r2", "r1", "r4", "r\x1b5", "r6", None],
            ["ok", "ok", None, "dup", "", "ok", "ok", "ok"],
            id=pa.string(),
        ),
        row_group_size=3,
    ),
    # Hostile but valid: ids that look like paths must be accepted and never become paths.
    "path_like_ids.parquet": lambda: _parquet(
        _table(["../../etc/x", "/etc/passwd", "..\\..\\win", "a/../../b", "~root"], ["p"] * 5)
    ),
    # ---- JSONL: unreadable or empty files
    "empty.jsonl": lambda: b"",
    "blank_lines_only.jsonl": lambda: b"\n   \n\t\n",
    "utf16.jsonl": lambda: '{"id": "a", "prompt": "x"}\n'.encode("utf-16"),
    "truncated.jsonl.gz": lambda: _gzip(_lines(*[GOOD | {"id": f"r{i}"} for i in range(500)]))[
        :300
    ],
    # ---- JSONL: bad lines
    "malformed.jsonl": lambda: _lines(GOOD) + b'{"id": "b", "prompt": \n' + _lines(GOOD),
    "invalid_utf8.jsonl": lambda: (
        _lines(GOOD, {"id": "b", "prompt": "y"}) + b'{"id": "c", "prompt": "caf\xff"}\n'
    ),
    "bom_mid_file.jsonl": lambda: (
        _lines(GOOD) + b"\xef\xbb\xbf" + _lines({"id": "b", "prompt": "y"})
    ),
    "not_object.jsonl": lambda: b"[1, 2, 3]\n" + _lines(GOOD),
    "missing_prompt_field.jsonl": lambda: _lines({"id": "a", "text": "hi"}),
    "prompt_number.jsonl": lambda: _lines(GOOD, {"id": "b", "prompt": 42}),
    "prompt_nested.jsonl": lambda: _lines({"id": "a", "prompt": {"text": "hi"}}),
    "null_prompt.jsonl": lambda: _lines(GOOD, {"id": "b", "prompt": None}),
    "empty_prompt.jsonl": lambda: _lines({"id": "a", "prompt": ""}),
    "duplicate_ids.jsonl": lambda: _lines(GOOD, {"id": "b", "prompt": "y"}, GOOD),
    "id_bool.jsonl": lambda: _lines({"id": True, "prompt": "x"}),
    "control_char_id.jsonl": lambda: _lines({"id": "x\u0007y", "prompt": "x"}),
    "line_separator_id.jsonl": lambda: _lines({"id": "x\u2028y", "prompt": "x"}),
    "huge_prompt.jsonl.gz": lambda: _gzip(_lines(GOOD, {"id": "big", "prompt": "a" * TEN_MB})),
    "mixed_valid_invalid.jsonl": lambda: (
        _lines({"id": "r1", "prompt": "ok"})
        + b"{not json}\n"
        + _lines(
            {"id": "r3", "prompt": ""}, {"id": "r1", "prompt": "dup"}, {"id": "r5", "prompt": "ok"}
        )
        + b'{"id": "r6", "prompt": "\xc3\x28"}\n'
        + _lines({"id": "r7", "prompt": "ok"})
    ),
    # ---- OpenAI batch lines
    "openai_empty_messages.jsonl": lambda: _lines(_openai("req-1", {"messages": []})),
    "openai_no_prompt.jsonl": lambda: _lines(_openai("req-1", {"model": "cola"})),
    "openai_bad_max_tokens.jsonl": lambda: _lines(
        _openai("req-1", {"prompt": "hi", "max_tokens": -5})
    ),
    "openai_bad_temperature.jsonl": lambda: _lines(
        _openai("req-1", {"prompt": "hi", "temperature": "hot"})
    ),
    "openai_body_not_object.jsonl": lambda: _lines(_openai("req-1", "hello")),
    "openai_blank_messages.jsonl": lambda: _lines(
        _openai("req-1", {"messages": [{"role": "system", "content": "  "}, {"role": "user"}]})
    ),
    # Hostile but valid: a BOM at the very start and Windows line endings are accepted.
    "bom_crlf.jsonl": lambda: (
        b"\xef\xbb\xbf" + _lines(GOOD, {"id": "b", "prompt": "y"}).replace(b"\n", b"\r\n")
    ),
}


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in CASES.items():
        path = out_dir / name
        path.write_bytes(make())
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "bad_inputs"
    files = generate(target)
    print(f"wrote {len(files)} files to {target}")
