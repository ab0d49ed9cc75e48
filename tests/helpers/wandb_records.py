"""Read an offline wandb run file (`run-<id>.wandb`) back: its W&B LevelDB-style log of protobuf records (wandb
0.31 writes it from Go and ships no Python reader). Blocks of 32 KiB; the file starts with ':W&B' + magic 0xBEE1
+ version 0; each record chunk has a 7-byte header (CRC32, little-endian length, type: 1 full, 2 first,
3 middle, 4 last)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list[Any]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe", f"{path} is not a wandb run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:                      # block trailer: zero padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """The logged history rows (key -> value), in order."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_group(path: Path) -> str:
    return next(r.run.run_group for r in records(path) if r.WhichOneof("record_type") == "run")
