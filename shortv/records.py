"""Append-only JSONL result files that survive interruption: what makes calibration and evaluation resumable.

A run folder holds the records (one JSON line per finished sample), a run file with the settings that made them, and
the final outputs. `start_run` opens it: a fresh run refuses a folder that already holds results, and a resumed run
refuses one whose settings differ (naming each difference), so two setups are never mixed. `append_records` first
repairs a last line left half-written by a crash or a full disk, so later records never glue onto it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .files import atomic_write_text, read_json


def _tail_start(data: bytes) -> int:
    """Offset where the last line starts when that line is unfinished (no newline, not a whole JSON object)."""
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    if not tail.strip():
        return len(data)
    try:
        json.loads(tail)
    except ValueError:  # JSONDecodeError, or bytes cut inside a UTF-8 character
        return start
    return len(data)  # a whole record that only lacks its newline


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records by ``id``. A last line cut short by a kill or a full disk is ignored, so its work simply reruns."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    data = path.read_bytes()
    lines = data[: _tail_start(data)].splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[record["id"]] = record
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{path}:{number} is corrupt; delete the line or start a new output folder") from None
    return records


def repair_tail(path: Path) -> None:
    """Cut an unfinished last line (its work was not recorded) and end a whole last record with its newline."""
    if not path.exists():
        return
    data = path.read_bytes()
    start = _tail_start(data)
    with path.open("r+b") as handle:
        if start < len(data):
            handle.truncate(start)
        elif data and not data.endswith(b"\n"):
            handle.seek(0, 2)
            handle.write(b"\n")


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write finished work at once, one line per record, so an interruption loses at most the work in flight."""
    text = "".join(json.dumps(record, allow_nan=False) + "\n" for record in records)
    repair_tail(path)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()


def _as_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings)))  # tuples -> lists, keys -> str: compares equal to a reloaded run


def check_fresh(out_dir: Path, names: Sequence[str]) -> None:
    """Refuse to start a new run in a folder that holds any of ``names`` (a finished or interrupted run's files)."""
    existing = [name for name in names if (out_dir / name).exists()]
    if existing:
        raise FileExistsError(
            f"{out_dir} already holds results ({', '.join(existing)}); pass --resume (resume=True) to continue "
            "that run, or choose another output folder"
        )


def start_run(
    out_dir: Path,
    records_name: str,
    run_name: str,
    settings: Mapping[str, Any],
    resume: bool,
    outputs: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Check ``out_dir`` for a run with ``settings`` and record them; returns the finished records to skip.

    Without ``resume``, a folder that already holds the records or any of ``outputs`` is refused. With it, the
    interrupted run's settings (``run_name``) must equal ``settings``; the message names every difference.
    The caller holds the folder's lock (`shortv.files.exclusive_output`).
    """
    records_path, run_path = out_dir / records_name, out_dir / run_name
    settings = _as_json(settings)
    if not resume:
        check_fresh(out_dir, (records_name, *outputs))
    elif run_path.exists():
        previous = read_json(run_path)
        if not isinstance(previous, dict):
            raise ValueError(f"{run_path}: expected a JSON object of run settings; choose another output folder")
        differences = [
            f"{key}: {previous.get(key)!r} before, {settings.get(key)!r} now"
            for key in sorted(set(previous) | set(settings))
            if previous.get(key) != settings.get(key)
        ]
        if differences:
            raise ValueError(
                f"cannot resume {out_dir}: the interrupted run had other settings ({'; '.join(differences)}); "
                "run with the same settings, or choose another output folder"
            )
    elif records_path.exists():
        raise ValueError(
            f"cannot resume {out_dir}: {records_path} has no {run_name} recording the settings that made it; "
            "choose another output folder"
        )
    atomic_write_text(run_path, json.dumps(settings, indent=1) + "\n")
    return read_records(records_path) if resume else {}
