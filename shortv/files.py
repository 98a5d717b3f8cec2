"""Files read and written safely: a final file appears whole or not at all, one process writes a folder at a time, and
a bad JSON file is named in its error.

* `atomic_write_text` / `replaced_on_success`: write to a temporary file beside the target, then rename it over the
  target (``os.replace`` is atomic on POSIX and Windows), so a crash or a full disk never leaves a half-written
  ``lc.json``, ``shortv_config.json`` or ``summary.json``.
* `exclusive_output`: a lock file in the folder (`filelock`), held for the whole run (by its main process when the run
  has several, `shortv.processes.main_holds`); a second run on the same folder is refused at once instead of redoing
  all the work and writing every record twice.
* `refuse_existing`: a command's output folder or file that already holds something is refused unless the user
  passes ``--overwrite`` (``shortv demo``, ``shortv bench --out``; calibrate and eval refuse a folder with results
  unless ``--resume``, `shortv.records.check_fresh`).
* `read_json`: a user's JSON file (UTF-8, with or without a byte-order mark); every error names the file and line.
* `output_file`: where a command writes the one file the user named (a folder means a default name in it), checked
  writable before the work starts, so that a long run never ends unable to save.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".shortv.lock"


class OutputBusyError(BlockingIOError):
    """Another process holds the output folder's lock."""


def output_folder(path: str | Path) -> Path:
    """``path`` as an existing folder (created if missing); a clear error when it names a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder; give an output folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    """Raise `FileExistsError` if ``path`` is a file, or a folder holding anything but a lock file, unless
    ``overwrite``: a command never replaces an earlier result without being told to."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    if path.is_dir():
        held = sorted(entry.name for entry in path.iterdir() if entry.name != LOCK_FILE)
        if not held:
            return
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise FileExistsError(f"{path} already holds {shown}; pass --overwrite to replace them, or choose another "
                              "output folder")
    raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or choose another output file")


@contextmanager
def replaced_on_success(path: str | Path) -> Iterator[Path]:
    """A temporary path (same folder and extension) to write; it replaces ``path`` only when the block succeeds."""
    path = Path(path)
    output_folder(path.parent)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the whole new one."""
    path = Path(path)
    with replaced_on_success(path) as temporary:
        with temporary.open("x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return path


@contextmanager
def exclusive_output(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block, or raise `OutputBusyError` at once if another process holds it.

    Re-entrant within a process (``calibrate`` holds it around ``layer_contribution``, which takes it too).
    """
    from filelock import FileLock, Timeout

    folder = output_folder(folder)
    lock_path = (folder / LOCK_FILE).resolve()
    lock = FileLock(lock_path, timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise OutputBusyError(
            f"{folder} is in use by another shortv process (it holds {lock_path}); wait for it to finish, "
            "or choose another output folder"
        ) from None
    try:
        yield folder
    finally:
        lock.release()


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; errors (missing, not UTF-8, not JSON) are one ValueError/OSError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from None


def output_file(path: str | Path, default_name: str) -> tuple[Path, Path | None]:
    """(file to write, folder created for it or None) for an output file the user named.

    ``path`` names the file, or a folder to write ``default_name`` into when it is an existing folder or ends with a
    path separator. A missing folder is created, as the commands create their output folders, and returned so that
    the caller says so. The folder is checked writable now by creating and removing a probe file (permissions,
    read-only file systems); every problem is one OSError saying what to do instead.
    """
    text = str(path)
    target = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or target.is_dir():
        target = target / default_name
    folder = target.parent
    missing = next((ancestor for ancestor in reversed((folder, *folder.parents)) if not ancestor.exists()), None)
    try:
        output_folder(folder)
        probe = folder / f".{target.name}.{uuid.uuid4().hex[:12]}.probe"
        probe.touch(exist_ok=False)
        probe.unlink()
    except NotADirectoryError:
        raise NotADirectoryError(f"cannot write {target}: part of {folder} is a file, not a folder") from None
    except OSError as error:
        raise OSError(f"cannot write {target}: {missing or folder} is not writable ({error.strerror}); choose a "
                      "location you can write to, e.g. a file in the current folder") from None
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a folder")
    return target, missing
