"""Reading W&B's offline run files (``offline-run-*/run-*.wandb``) in tests.

wandb 0.31 ships no Python reader for them (its core is in Go); the format is LevelDB's log
format: 32 KiB blocks of chunks with a 7-byte header (CRC, length, type), after a 7-byte
``:W&B`` file header; each whole record is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768


def wandb_records(path: Path, wait_s: float = 120.0) -> list:
    """Every record of a finished offline ``.wandb`` file, in order.

    W&B's service process may still be writing the file when ``run.finish()`` has
    returned (seen here: only the 7-byte header right after it, on a loaded machine), so
    this waits until the file ends with the run's ``exit`` record (at most ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        records = _parse(Path(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {wait_s} s"
        time.sleep(0.2)


def _parse(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, records = path.read_bytes(), 7, b"", []
    if data[:4] != b":W&B":  # not even the header yet
        return []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind == 2 else buf + chunk  # FIRST starts, MIDDLE/LAST extend
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def of_type(records: list, kind: str) -> list:
    """The records of one type (``run``, ``history``, ``artifact``, ``metric``, ...)."""
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history_rows(records: list) -> list[dict]:
    """The logged history rows: ``{key: value}`` with ``_step`` among them."""
    rows = []
    for h in of_type(records, "history"):
        row = {}
        for item in h.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
