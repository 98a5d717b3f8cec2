"""Append-only JSONL result files that survive interruption: what makes calibration and evaluation resumable."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records by ``id``. A last line cut short by a kill mid-write is dropped, so its work simply reruns."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is corrupt; delete the line or start a new output folder") from None
        records[record["id"]] = record
    return records


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write finished work at once, one line per record, so an interruption loses at most the work in flight."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    with path.open("a") as handle:
        handle.write(text)
        handle.flush()
