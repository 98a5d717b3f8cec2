"""Result files under faults: a full disk mid-write, a crash mid-save, two processes on one output folder."""

import json
import resource
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest

from shortv import LCResult, ShortVConfig, files
from shortv.files import LOCK_FILE, OutputBusyError, atomic_write_text, exclusive_output, read_json, refuse_existing
from shortv.records import append_records, merge_shards, read_records, record_files, shard_path, start_run


@contextmanager
def disk_full_beyond(size):
    """Files may grow to ``size`` bytes: past it write() fails part-way with EFBIG (RLIMIT_FSIZE), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a signal that kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def records(first, count):
    return [{"id": f"s{index}", "lc": {"visual": [0.25 * index] * 12}} for index in range(first, first + count)]


def test_disk_full_mid_record_is_repaired_before_the_next_append(tmp_path):
    path = tmp_path / "lc_samples.jsonl"
    append_records(path, records(0, 2))
    whole = path.stat().st_size
    with pytest.raises(OSError, match="File too large"), disk_full_beyond(whole + 40):
        append_records(path, records(2, 1))
    data = path.read_bytes()
    assert len(data) == whole + 40 and not data.endswith(b"\n")  # half a record on the last line

    assert sorted(read_records(path)) == ["s0", "s1"]  # the half record is not work done
    append_records(path, records(2, 2))  # what a resumed run does next
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["s0", "s1", "s2", "s3"]
    assert sorted(read_records(path)) == ["s0", "s1", "s2", "s3"]


def test_a_whole_last_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"}))
    assert sorted(read_records(path)) == ["a", "b"]
    append_records(path, [{"id": "c"}])
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "x\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2 is corrupt"):
        read_records(path)


def test_records_are_strict_json(tmp_path):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        append_records(tmp_path / "r.jsonl", [{"id": "a", "lc": float("nan")}])
    assert not (tmp_path / "r.jsonl").exists()


# Final files, each far larger than the disk has room for.
BIG_SAVES = {
    "text": lambda path: atomic_write_text(path, "x" * 100000),
    "config": lambda path: ShortVConfig([1], provenance={"note": "x" * 100000}).save(path),
    "lc": lambda path: LCResult(num_layers=2, token_types=("visual",), sample_ids=[f"s{i}" for i in range(5000)],
                                per_sample={"visual": [[0.5, 0.25]] * 5000}).save(path),
}


@pytest.mark.parametrize("writer", sorted(BIG_SAVES))
def test_final_files_stay_whole_when_the_disk_fills_mid_save(tmp_path, writer):
    path = tmp_path / "final.json"
    atomic_write_text(path, json.dumps({"old": True}))
    with pytest.raises(OSError, match="File too large"), disk_full_beyond(1000):
        BIG_SAVES[writer](path)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"]  # no temporary file left behind


# Another process holding an output folder's lock (it imports shortv/files.py alone: no torch, starts at once).
HOLD_LOCK = """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("files", sys.argv[2])
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    with files.exclusive_output(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes our stdin
"""


def test_second_process_on_one_output_folder_is_refused(tmp_path, monkeypatch):
    import shortv.contribution as contribution
    from test_contribution import calibration_samples
    from tiny_models import build_model

    model = build_model("llava", init_std=0.2)
    samples = calibration_samples(model, "llava", count=2)
    out = tmp_path / "cal"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(out), files.__file__],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        real = contribution.sample_contribution
        monkeypatch.setattr(contribution, "sample_contribution", lambda *a, **k: pytest.fail("computed anyway"))
        with pytest.raises(OutputBusyError, match=r"cal is in use by another shortv process .*\.shortv\.lock"):
            contribution.layer_contribution(model, samples, out_dir=out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".shortv.lock"]  # nothing written
        monkeypatch.setattr(contribution, "sample_contribution", real)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    result = contribution.layer_contribution(model, samples, out_dir=out, progress=False)  # free again
    assert sorted(read_records(out / "lc_samples.jsonl")) == result.sample_ids
    with exclusive_output(out), exclusive_output(out):  # re-entrant within one process
        pass


def test_start_run_names_each_changed_setting_and_needs_the_run_file(tmp_path):
    settings = {"model_id": "/m", "max_new_tokens": 8, "layers": (1, 2)}
    assert start_run(tmp_path, "records.jsonl", "run.json", settings, resume=False) == {}
    append_records(tmp_path / "records.jsonl", [{"id": "a"}])
    assert list(start_run(tmp_path, "records.jsonl", "run.json", settings, resume=True)) == ["a"]
    changed = {**settings, "model_id": "/other", "max_new_tokens": 16}
    with pytest.raises(ValueError, match=r"max_new_tokens: 8 before, 16 now; model_id: '/m' before, '/other' now"):
        start_run(tmp_path, "records.jsonl", "run.json", changed, resume=True)
    with pytest.raises(FileExistsError, match=r"already holds results \(records.jsonl, summary.json\)"):
        (tmp_path / "summary.json").write_text("{}")
        start_run(tmp_path, "records.jsonl", "run.json", settings, resume=False, outputs=("summary.json",))
    (tmp_path / "run.json").unlink()
    with pytest.raises(ValueError, match=r"records.jsonl has no run.json recording the settings"):
        start_run(tmp_path, "records.jsonl", "run.json", settings, resume=True)


def test_records_of_several_processes_are_one_run_and_merge_in_sample_order(tmp_path):
    settings = {"model_id": "/m"}
    for process, ids in [(1, ["b"]), (10, ["e"]), (2, ["c", "d"])]:  # the main process recorded nothing yet
        append_records(shard_path(tmp_path, "records.jsonl", process), [{"id": i} for i in ids])
    names = ["records.rank1.jsonl", "records.rank2.jsonl", "records.rank10.jsonl"]
    assert [path.name for path in record_files(tmp_path, "records.jsonl")] == names
    with pytest.raises(ValueError, match=r"records.rank1.jsonl has no run.json recording the settings"):
        start_run(tmp_path, "records.jsonl", "run.json", settings, resume=True)
    with pytest.raises(FileExistsError, match=r"already holds results \(records.rank1.jsonl, records.rank2.jsonl"):
        start_run(tmp_path, "records.jsonl", "run.json", settings, resume=False)
    (tmp_path / "run.json").write_text(json.dumps(settings))
    append_records(shard_path(tmp_path, "records.jsonl", 0), [{"id": "a"}])
    assert sorted(start_run(tmp_path, "records.jsonl", "run.json", settings, resume=True)) == ["a", "b", "c", "d", "e"]

    merge_shards(tmp_path, "records.jsonl", [{"id": i} for i in "abcde"])
    assert record_files(tmp_path, "records.jsonl") == [tmp_path / "records.jsonl"]
    assert list(read_records(tmp_path / "records.jsonl")) == list("abcde")
    append_records(tmp_path / "records.jsonl", [{"id": "z"}])  # one process's file, no shards: left as written
    merge_shards(tmp_path, "records.jsonl", [{"id": i} for i in "abcde"])
    assert list(read_records(tmp_path / "records.jsonl")) == list("abcdez")


def test_an_output_that_holds_something_is_refused_unless_overwrite(tmp_path):
    refuse_existing(tmp_path / "new", overwrite=False)  # missing: fine
    (tmp_path / "empty").mkdir()
    refuse_existing(tmp_path / "empty", overwrite=False)
    (tmp_path / "empty" / LOCK_FILE).write_text("")  # a lock file left by an earlier run holds no result
    refuse_existing(tmp_path / "empty", overwrite=False)
    folder = tmp_path / "used"
    folder.mkdir()
    for name in "abcdef":
        (folder / name).write_text(name)
    with pytest.raises(FileExistsError, match=r"used already holds a, b, c, d and 2 more; pass --overwrite"):
        refuse_existing(folder, overwrite=False)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"r.json already exists; pass --overwrite to replace it"):
        refuse_existing(tmp_path / "r.json", overwrite=False)
    refuse_existing(folder, overwrite=True)
    refuse_existing(tmp_path / "r.json", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == list("abcdef")  # the check itself removes nothing


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"out is a file, not a folder"):
        with exclusive_output(tmp_path / "out"):
            pass


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\xef\xbb\xbf{\"a\": 1}", None), (b'{"a": \xff}', r"x.json: not UTF-8 text \(invalid start byte at byte 6\)"),
     (b'{\n"a": }', r"x.json:2: not valid JSON")],
)
def test_read_json_accepts_a_bom_and_names_the_file(tmp_path, content, message):
    (tmp_path / "x.json").write_bytes(content)
    if message is None:
        assert read_json(tmp_path / "x.json") == {"a": 1}
    else:
        with pytest.raises(ValueError, match=message):
            read_json(tmp_path / "x.json")
