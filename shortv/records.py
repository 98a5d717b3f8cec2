"""Append-only JSONL result files that survive interruption: what makes calibration and evaluation resumable.

A run folder holds the records (one JSON line per finished sample), a run file with the settings that made them, and
the final outputs. `start_run` opens it: a fresh run refuses a folder that already holds results, and a resumed run
refuses one whose settings differ (naming each difference), so two setups are never mixed. `append_records` first
repairs a last line left half-written by a crash or a full disk, so later records never glue onto it.

A run of several processes (`shortv.processes`) writes one records file per process, so that no two processes append
to one file: process 0 the usual ``NAME.jsonl``, process ``k`` ``NAME.rank{k}.jsonl``. A run's records are the union
of these files, whatever number of processes wrote them, so a resumed run with more or fewer processes skips exactly
the finished samples. At the end, `merge_shards` folds them into ``NAME.jsonl`` in sample order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .files import atomic_write_text, read_json
from .fingerprint import WeightsFingerprint, describe_difference, recorded_fingerprint, warn


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


def shard_path(out_dir: Path, name: str, process: int) -> Path:
    """The records file process ``process`` appends to: ``name`` itself for process 0 (and a single process)."""
    path = out_dir / name
    return path if process == 0 else path.with_name(f"{path.stem}.rank{process}{path.suffix}")


def _shards(out_dir: Path, name: str) -> list[Path]:
    """The existing shard files of processes 1, 2, ... beside ``name``, in process order."""
    main = out_dir / name
    pattern = re.compile(re.escape(main.stem) + r"\.rank([1-9][0-9]*)" + re.escape(main.suffix))
    shards = {int(match[1]): path for path in out_dir.iterdir() if (match := pattern.fullmatch(path.name))}
    return [shards[index] for index in sorted(shards)]


def record_files(out_dir: Path, name: str) -> list[Path]:
    """The existing records files of a run: ``name``, then the other processes' shards."""
    return [path for path in (out_dir / name,) if path.exists()] + _shards(out_dir, name)


def read_run_records(out_dir: Path, name: str) -> dict[str, dict[str, Any]]:
    """Records by ``id`` from all of a run's records files (`read_records` of each)."""
    records: dict[str, dict[str, Any]] = {}
    for path in record_files(out_dir, name):
        records.update(read_records(path))
    return records


def merge_shards(out_dir: Path, name: str, records: Sequence[dict[str, Any]]) -> None:
    """After a run of several processes: all its ``records``, in sample order, become ``name`` (atomically) and the
    other processes' shards go. A crash in between leaves records twice, which `read_run_records` reads as once. A
    single process's file, with no shards beside it, stays as it was written."""
    shards = _shards(out_dir, name)
    if not shards:
        return
    atomic_write_text(out_dir / name, "".join(json.dumps(record, allow_nan=False) + "\n" for record in records))
    for path in shards:
        path.unlink()


def _as_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings)))  # tuples -> lists, keys -> str: compares equal to a reloaded run


def check_fresh(out_dir: Path, names: Sequence[str]) -> None:
    """Refuse to start a new run in a folder that holds any of ``names`` or their shards (a finished or interrupted
    run's files)."""
    existing = [path.name for name in names for path in record_files(out_dir, name)]
    if existing:
        raise FileExistsError(
            f"{out_dir} already holds results ({', '.join(existing)}); to continue that run, rerun with --resume "
            "(resume=True in Python); to start afresh, choose another output folder"
        )


def start_run(
    out_dir: Path,
    records_name: str,
    run_name: str,
    settings: Mapping[str, Any],
    resume: bool,
    outputs: Sequence[str] = (),
    weights: WeightsFingerprint | None = None,
) -> dict[str, dict[str, Any]]:
    """Check ``out_dir`` for a run with ``settings`` and record them; returns the finished records to skip.

    Without ``resume``, a folder that already holds the records or any of ``outputs`` is refused. With it, the
    interrupted run's settings (``run_name``) must equal ``settings``; the message names every difference. So must
    its ``weights`` (`shortv.fingerprint`), recorded beside the settings; a run file without them (an older shortv)
    is resumed with one warning. The caller holds the folder's lock (`shortv.files.exclusive_output`).
    """
    run_path = out_dir / run_name
    settings = _as_json(settings)
    if not resume:
        check_fresh(out_dir, (records_name, *outputs))
    elif run_path.exists():
        previous = read_json(run_path)
        if not isinstance(previous, dict):
            raise ValueError(f"{run_path}: expected a JSON object of run settings; choose another output folder")
        if weights is not None:
            check_weights(out_dir, run_name, weights, previous, warn_unknown=True)
        previous.pop("weights", None)
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
    elif existing := record_files(out_dir, records_name):
        raise ValueError(
            f"cannot resume {out_dir}: {existing[0]} has no {run_name} recording the settings that made it; "
            "choose another output folder"
        )
    if weights is not None:
        settings["weights"] = weights.to_dict()
    atomic_write_text(run_path, json.dumps(settings, indent=1) + "\n")
    return read_run_records(out_dir, records_name) if resume else {}


def check_weights(out_dir: Path, run_name: str, weights: WeightsFingerprint, previous: Any = None,
                  warn_unknown: bool = False) -> None:
    """Refuse to resume the run in ``out_dir`` with weights other than the interrupted run's (read from its run file
    ``run_name``, or given as ``previous``). Commands call it before the model loads; `start_run` again, and
    ``warn_unknown`` there warns once when the run recorded no weights."""
    run_path = out_dir / run_name
    if previous is None:
        if not run_path.exists():
            return
        previous = read_json(run_path)
    if not isinstance(previous, dict):
        return  # start_run names the problem
    recorded = recorded_fingerprint(previous.get("weights"), str(run_path))
    if recorded is None:
        if warn_unknown:
            warn(f"{run_path} records no weights fingerprint (written by an older shortv): cannot check that the "
                 "interrupted run used these weights")
    elif recorded.digest != weights.digest:
        raise ValueError(
            f"cannot resume {out_dir}: the weights differ from the interrupted run's "
            f"({describe_difference(recorded, weights)}); resume with the weights it used ({recorded.label()}), "
            "or choose another output folder"
        )
