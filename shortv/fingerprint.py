"""A cheap fingerprint of a model's weights: what binds a run, an LC file and a config to the weights that made them.

A `WeightsFingerprint` is one of three kinds of identity:

* ``hub``: a model given by hub id: the repo id and the commit hash of the snapshot it loads from (immutable).
* ``files``: a local folder: every weight file transformers would load (``*.safetensors``, else pickled ``*.bin``,
  and their ``*.index.json`` of a sharded checkpoint): its size, a hash of its header (of its whole content for an
  index), and per tensor its dtype, shape, byte range and a hash of sampled bytes (`WINDOWS` windows of
  `WINDOW_BYTES` bytes: the start, the middle and the end of the tensor; all of it when smaller).
* ``memory``: a model object (built from a config, or handed over by a library caller): the same per tensor of its
  state dict, read from memory (a tensor on the ``meta`` device, as accelerate's offloading leaves it, or without
  plain bytes, as a quantized one, has no bytes to sample: only its dtype and shape count).

Reading a folder costs a header read per file and ``WINDOWS`` small reads per tensor (random access, no readahead):
well under a second for 7B weights (``benchmarks/bench_fingerprint.py``), never a full hash. Sampling misses a change
confined to bytes between the windows (one edited weight); any training, re-initialisation, re-quantisation or
swapped file changes every window. Two fingerprints are the same weights when their `digest` is equal;
`describe_difference` names what differs (which file, which tensor; size, header or sampled bytes).

Run files record the full fingerprint (one line per tensor: about 90 kB for 7B weights), so that a refused resume
names the tensors; configs and LC files record its `compact` form (per file its size and a short digest of those
lines: a few hundred bytes), which names the files. Both give the same `digest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

WINDOW_BYTES = 4096
WINDOWS = 3
KINDS = ("hub", "files", "memory")
#: How many differing tensors a description names before "and N more".
_NAMED = 3


class WeightsWarning(UserWarning):
    """A file whose weights cannot be checked (no fingerprint) or that was accepted for other weights."""


def warn(message: str) -> None:
    warnings.warn(message, WeightsWarning, stacklevel=3)


@dataclass
class FileFingerprint:
    """One weight file: its size and a short `digest` of its content. In full (run files) also a hash of its header
    and per tensor ``"DTYPE [shape] @begin-end samples"``, which `digest` hashes; compact (configs, LC files) without.
    """

    size: int
    digest: str = ""
    header: str | None = None
    tensors: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.header is None:  # compact: the digest is all there is
            if not self.digest or self.tensors:
                raise ValueError("a weight file needs its digest, or its header and tensors")
            return
        digest = hashlib.sha256(json.dumps([self.header, self.tensors], sort_keys=True).encode()).hexdigest()[:16]
        if self.digest and self.digest != digest:
            raise ValueError("weights fingerprint: a file's digest does not match its tensors (edited by hand?)")
        self.digest = digest

    def to_dict(self) -> dict[str, Any]:
        compact = {"size": self.size, "digest": self.digest}
        return compact if self.header is None else {**compact, "header": self.header, "tensors": self.tensors}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> FileFingerprint:
        header = entry.get("header")
        return cls(int(entry["size"]), str(entry.get("digest", "")), None if header is None else str(header),
                   {str(name): str(line) for name, line in entry.get("tensors", {}).items()})


@dataclass(eq=False)
class WeightsFingerprint:
    """One model's weights; equal when their digests are (a full fingerprint and its `compact` form are equal)."""

    kind: str
    #: sha256 over the kind, repo, revision and each file's name, size and digest: equal digests, same weights, in
    #: full and compact form alike.
    digest: str = ""
    repo: str | None = None
    revision: str | None = None
    files: dict[str, FileFingerprint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown weights fingerprint kind {self.kind!r}; expected one of {KINDS}")
        files = {name: [entry.size, entry.digest] for name, entry in sorted(self.files.items())}
        digest = hashlib.sha256(json.dumps([self.kind, self.repo, self.revision, files]).encode()).hexdigest()
        if self.digest and self.digest != digest:
            raise ValueError("weights fingerprint: its digest does not match its content (edited by hand?)")
        self.digest = digest

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightsFingerprint) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def compact(self) -> WeightsFingerprint:
        """The same identity without the per-tensor lines (a few hundred bytes): what configs and LC files record."""
        return replace(self, files={name: FileFingerprint(entry.size, entry.digest)
                                    for name, entry in self.files.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "digest": self.digest, "repo": self.repo, "revision": self.revision,
                "files": {name: entry.to_dict() for name, entry in self.files.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> WeightsFingerprint:
        """The inverse of `to_dict` (full or compact, and the full form of the first version, whose digest was
        computed otherwise); a malformed value is a ValueError."""
        try:
            entries = data.get("files", {})
            legacy = any("digest" not in entry for entry in entries.values())
            if legacy and data.get("digest") != _first_version_digest(data):
                raise ValueError("its digest does not match its content (edited by hand?)")
            files = {str(name): FileFingerprint.from_dict(entry) for name, entry in entries.items()}
            return cls(kind=data["kind"], digest="" if legacy else str(data.get("digest", "")), repo=data.get("repo"),
                       revision=data.get("revision"), files=files)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"not a weights fingerprint: {error}") from None

    def label(self) -> str:
        """A short identity for messages: ``hub owner/name@commit``, ``files 3f2a9c1b0d4e (4 files, 14.1 GB)``."""
        if self.kind == "hub":
            return f"hub {self.repo}@{(self.revision or 'unknown')[:12]}"
        where = f"{len(self.files)} file{'s' * (len(self.files) != 1)}, " if self.kind == "files" else ""
        size = sum(entry.size for entry in self.files.values())
        amount = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        return f"{self.kind} {self.digest[:12]} ({where}{amount})"


def _first_version_digest(data: dict[str, Any]) -> str:
    """The digest of a fingerprint written by the first version (every file in full, no per-file digest)."""
    files = {name: {"size": entry["size"], "header": entry["header"], "tensors": entry["tensors"]}
             for name, entry in sorted(data["files"].items())}
    body = json.dumps([data["kind"], data.get("repo"), data.get("revision"), files], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def describe_difference(a: WeightsFingerprint, b: WeightsFingerprint) -> str:
    """What differs from ``a`` to ``b``, in one line ("" when they are the same weights): the files, and when both
    are full, the tensors."""
    if a.digest == b.digest:
        return ""
    if a.kind != b.kind:
        return f"{a.label()} against {b.label()}: fingerprints of different kinds cannot be compared"
    if a.kind == "hub":
        return (f"repo {a.repo} before, {b.repo} now" if a.repo != b.repo
                else f"{a.repo}: revision {a.revision} before, {b.revision} now")
    parts = []
    if only := sorted(set(a.files) - set(b.files)):
        parts.append(f"{_names(only)} no longer there")
    if new := sorted(set(b.files) - set(a.files)):
        parts.append(f"{_names(new)} new")
    for name in sorted(set(a.files) & set(b.files)):
        before, now = a.files[name], b.files[name]
        if (before.size, before.digest) == (now.size, now.digest):
            continue
        changes = []
        if before.size != now.size:
            changes.append(f"size {before.size} before, {now.size} now")
        full = before.header is not None and now.header is not None  # a compact one names the file, not tensors
        if full:
            for kind, tensors in _tensor_changes(before.tensors, now.tensors).items():
                changes.append(f"{kind} of tensor{'s' * (len(tensors) > 1)} {_names(tensors)}")
        if not changes:
            changes.append("header differs" if full else "header or sampled bytes differ")
        parts.append(f"{name}: {'; '.join(changes)}")
    return "; ".join(parts)


def _tensor_changes(before: dict[str, str], now: dict[str, str]) -> dict[str, list[str]]:
    changes: dict[str, list[str]] = {}
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name), now.get(name)
        if old == new:
            continue
        if old is None or new is None:
            kind = "new" if old is None else "missing"
        elif old.rsplit(" ", 1)[0] != new.rsplit(" ", 1)[0]:
            kind = "dtype, shape or position"
        else:
            kind = "sampled bytes"
        changes.setdefault(kind, []).append(name)
    return changes


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")


# ------------------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------------------
def _windows(length: int) -> list[tuple[int, int]]:
    """(offset, size) of the sampled windows of ``length`` bytes: all of them when small."""
    if length <= WINDOWS * WINDOW_BYTES:
        return [(0, length)]
    step = (length - WINDOW_BYTES) // (WINDOWS - 1)
    return [(index * step, WINDOW_BYTES) for index in range(WINDOWS)]


def _sample_hash(chunks: list[bytes]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _safetensors_file(path: Path) -> FileFingerprint:
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):  # a few windows per tensor: no readahead of what is not read
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        prefix = os.pread(fd, 8, 0)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= size - 8:
            raise ValueError("its header length does not fit the file")
        raw = os.pread(fd, length, 8)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise ValueError("its header is not JSON") from None
        start, tensors = 8 + length, {}
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            begin, end = (int(value) for value in info["data_offsets"])
            if not 0 <= begin <= end <= size - start:
                raise ValueError(f"tensor {name} lies outside the file")
            chunks = [os.pread(fd, count, start + begin + offset) for offset, count in _windows(end - begin)]
            tensors[name] = f"{info['dtype']} {list(info['shape'])} @{begin}-{end} {_sample_hash(chunks)}"
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a valid safetensors file ({error}); re-download or re-save the model") from None
    finally:
        os.close(fd)
    return FileFingerprint(size, header=hashlib.sha256(raw).hexdigest(), tensors=tensors)


def _tensor_entry(tensor: Any, where: str = "") -> str:
    """``"DTYPE [shape]{where} samples"`` of an in-memory (or memory-mapped) tensor."""
    import torch

    shape = list(tensor.shape)
    dtype = str(tensor.dtype).replace("torch.", "")
    if tensor.device.type == "meta":
        return f"{dtype} {shape}{where} meta"
    try:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    except (RuntimeError, TypeError, NotImplementedError):  # quantized, sparse...: no plain bytes to sample
        return f"{dtype} {shape}{where} unsampled"
    chunks = [data[offset : offset + count] for offset, count in _windows(data.numel())]
    return f"{dtype} {shape}{where} {_sample_hash([chunk.cpu().numpy().tobytes() for chunk in chunks])}"


def _pickled_file(path: Path) -> FileFingerprint:
    """A pickled PyTorch checkpoint: its tensors memory-mapped (zip format), or sampled as one blob (legacy)."""
    import torch

    size = path.stat().st_size
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict):
            raise TypeError("not a state dict")
        tensors = {str(name): _tensor_entry(value) for name, value in sorted(state.items())
                   if isinstance(value, torch.Tensor)}
        header = hashlib.sha256(json.dumps(sorted(tensors)).encode()).hexdigest()
        return FileFingerprint(size, header=header, tensors=tensors)
    except Exception:  # noqa: BLE001 - not loadable this way: loading names the problem; sample the bytes instead
        with path.open("rb") as handle:
            chunks = []
            for offset, count in _windows(size):
                handle.seek(offset)
                chunks.append(handle.read(count))
        return FileFingerprint(size, header=_sample_hash(chunks))


def weight_files(folder: Path) -> list[Path]:
    """The files transformers loads weights from: ``*.safetensors`` (else ``*.bin``), with their index."""
    for suffix in (".safetensors", ".bin"):
        files = sorted(folder.glob(f"*{suffix}"))
        if files:
            return files + sorted(folder.glob(f"*{suffix}.index.json"))
    return []


def fingerprint_folder(folder: str | Path) -> WeightsFingerprint:
    """The ``files`` fingerprint of a local model folder (clear ValueError for a corrupt safetensors file)."""
    folder = Path(folder)
    files = {}
    for path in weight_files(folder):
        if path.name.endswith(".index.json"):
            content = path.read_bytes()
            files[path.name] = FileFingerprint(len(content), header=hashlib.sha256(content).hexdigest())
        elif path.suffix == ".safetensors":
            files[path.name] = _safetensors_file(path)
        else:
            files[path.name] = _pickled_file(path)
    return WeightsFingerprint("files", files=files)


def fingerprint_hub(repo_id: str) -> WeightsFingerprint:
    """The ``hub`` fingerprint of a hub model: the commit of the snapshot its ``config.json`` was resolved from."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    resolved = cached_file(repo_id, "config.json", _raise_exceptions_for_missing_entries=False)
    return WeightsFingerprint("hub", repo=repo_id, revision=extract_commit_hash(resolved, None))


def fingerprint_model(model: Any) -> WeightsFingerprint:
    """The ``memory`` fingerprint of a model object: every tensor of its state dict, sampled in memory."""
    import torch

    with torch.no_grad():
        tensors = {name: _tensor_entry(value) for name, value in sorted(model.state_dict().items())}
    header = hashlib.sha256(json.dumps(sorted(tensors)).encode()).hexdigest()
    size = sum(value.numel() * value.element_size() for value in model.state_dict().values())
    return WeightsFingerprint("memory", files={"(memory)": FileFingerprint(size, header=header, tensors=tensors)})


def recorded_fingerprint(data: Any, where: str) -> WeightsFingerprint | None:
    """A fingerprint stored in a file (None when the file has none); ``where`` names the file in errors."""
    if data is None:
        return None
    try:
        return WeightsFingerprint.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
