"""`shortv calibrate` and `shortv eval` shared by two processes: the same result as one process, every sample computed
once, and resumed across a change in the number of processes.

One real launch on CPU (``python -m torch.distributed.run --standalone --nproc_per_node 2``, which accelerate's
``PartialState(cpu=True)`` joins as a gloo group) runs every two-process part, since each launch costs two imports of
torch: the primitives of `shortv.processes` on their own, a calibration interrupted in both processes (resumed here
by one process), and a calibration and an evaluation begun by one process (the run file and first records an
interruption leaves) that the two processes finish. The one-process references run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import shortv
from shortv.calibrate import calibrate
from shortv.contribution import RUN_FILE, SAMPLES_FILE, LCResult
from shortv.evaluation import PREDICTIONS_FILE, SUMMARY_JSON, evaluate_files
from shortv.evaluation import RUN_FILE as EVAL_RUN_FILE
from shortv.records import read_records, record_files, shard_path

REPO = Path(shortv.__file__).resolve().parents[1]
CALIB = 8  # calibration samples: 4 per process
TEST = 6  # evaluation samples: 3 per process, in batches of 2 (so the batches differ from one process's)
N = 6
pytestmark = pytest.mark.usefixtures("one_thread")  # as each launched process runs (OMP_NUM_THREADS=1)

TWO_PROCESSES = """
    import json, sys
    from pathlib import Path
    from click.exceptions import Abort
    import shortv.contribution
    from shortv.cli import app
    from shortv.files import OutputBusyError, exclusive_output
    from shortv.processes import main_holds, on_main, process_count, process_index, share

    folder, seen = Path(sys.argv[1]), {"processes": process_count()}

    # The primitives: work shared and gathered in order, errors raised on every process, the lock held by the main one.
    seen["shared"] = share(list(range(5)), lambda part: [(item, process_index()) for item in part])

    def fail_on_second(part):
        if process_index() == 1:
            raise ValueError(f"sample {part[0]} failed")
        return list(part)

    for name, call in [("share", lambda: share(list(range(4)), fail_on_second)),
                       ("on_main", lambda: on_main(lambda: open(folder / "missing.json")))]:
        try:
            call()
        except (ValueError, OSError) as error:
            seen[name] = f"{type(error).__name__}: {error}"

    def try_lock(part):
        try:
            with exclusive_output(folder / "locked"):  # re-entrant in the process holding it
                return ["taken"]
        except OutputBusyError:
            return ["refused"]

    with main_holds(exclusive_output, folder / "locked"):  # share gathers: the lock is held until both have tried
        seen["lock"] = share([0, 1], try_lock)
    (folder / f"seen{process_index()}.json").write_text(json.dumps(seen))

    # A calibration interrupted (Ctrl-C) in both processes as each begins its third sample.
    real, calls = shortv.contribution.sample_contribution, []

    def interrupted_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    shortv.contribution.sample_contribution = interrupted_at_the_third
    try:
        app(["calibrate", "--num-samples", sys.argv[3], "--out", str(folder / "interrupted")], standalone_mode=False)
    except Abort:
        pass
    shortv.contribution.sample_contribution = real

    for command in json.loads(sys.argv[2]):  # as `python -m shortv.cli COMMAND`, one after the other
        code = app(command, standalone_mode=False)
        if code:
            sys.exit(code)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: calibration on CALIB samples, then evaluation of its first N layers on TEST samples."""
    folder = tmp_path_factory.mktemp("one-process")
    calibration = calibrate(out_dir=folder / "cal", num_samples=CALIB, n=N, progress=False)
    summary = evaluate_files(lc=folder / "cal" / "lc.json", n=N, num_samples=TEST, batch_size=2,
                             out_dir=folder / "eval", progress=False)
    return calibration, summary, folder


@pytest.fixture(scope="module")
def two_processes(reference, tmp_path_factory):
    """The launch's folder: ``seen{rank}.json`` (primitives), ``interrupted`` (a two-process calibration stopped),
    ``cal`` and ``eval`` (runs begun by one process, finished by two)."""
    _, _, one_process = reference
    folder = tmp_path_factory.mktemp("two-processes")
    begun_runs = [("cal", RUN_FILE, SAMPLES_FILE, 3), ("eval", EVAL_RUN_FILE, PREDICTIONS_FILE, 2)]
    for name, run_file, records, begun in begun_runs:
        (folder / name).mkdir()
        shutil.copy(one_process / name / run_file, folder / name / run_file)
        lines = [json.loads(line) for line in (one_process / name / records).read_text().splitlines()[:begun]]
        if name == "eval":  # marked: a resumed run keeps them as they are
            lines = [{**record, "baseline_seconds": 1000.0} for record in lines]
        (folder / name / records).write_text("".join(json.dumps(record) + "\n" for record in lines))
    commands = [
        ["calibrate", "--num-samples", str(CALIB), "-n", str(N), "--out", str(folder / "cal"), "--resume"],
        ["eval", "--lc", str(one_process / "cal" / "lc.json"), "-n", str(N), "--num-samples", str(TEST),
         "--batch-size", "2", "--out", str(folder / "eval"), "--resume"],
    ]
    script = folder / "two_processes.py"
    script.write_text(textwrap.dedent(TWO_PROCESSES))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(folder), json.dumps(commands), str(CALIB)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, textwrap.shorten(run.stdout + run.stderr, 6000, placeholder=" ... ")
    return folder


def assert_same_lc(lc: LCResult, expected: LCResult) -> None:
    assert lc.sample_ids == expected.sample_ids  # the same samples, in the same order
    for token_type, rows in expected.per_sample.items():
        for row, expected_row in zip(lc.per_sample[token_type], rows):
            assert row == pytest.approx(expected_row, rel=1e-5, abs=1e-9)  # fp32 rounding at most
    assert lc.order == expected.order


def evaluations_per_sample(lc: LCResult) -> int:
    """Layer evaluations of one sample (the same for every sample of one model): the counter of computed samples."""
    return lc.metadata["layer_evaluations_this_run"] // len(lc.sample_ids)


def record_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_share_gathers_every_part_in_order_and_raises_errors_on_every_process(two_processes):
    main, other = (json.loads((two_processes / f"seen{rank}.json").read_text()) for rank in (0, 1))
    assert main["processes"] == other["processes"] == 2
    assert main["shared"] == other["shared"] == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 1]]  # each item once, in order
    assert main["share"] == other["share"] == "ValueError: sample 2 failed"
    assert main["on_main"].startswith("FileNotFoundError") and main["on_main"] == other["on_main"]
    assert main["lock"] == other["lock"] == ["taken", "refused"]  # the main process holds the lock for the run


def test_calibration_interrupted_with_two_processes_is_finished_by_one(reference, two_processes):
    calibration, _, _ = reference
    out = two_processes / "interrupted"
    # Each process recorded its first two samples in its own file, and stopped.
    assert record_files(out, SAMPLES_FILE) == [out / SAMPLES_FILE, shard_path(out, SAMPLES_FILE, 1)]
    ids = calibration.lc.sample_ids  # the first process's part is ids[:4], the second's ids[4:]
    assert list(read_records(out / SAMPLES_FILE)) == ids[:2]
    assert list(read_records(shard_path(out, SAMPLES_FILE, 1))) == ids[4:6]

    resumed = calibrate(out_dir=out, num_samples=CALIB, n=N, resume=True, progress=False)
    assert_same_lc(resumed.lc, calibration.lc)
    assert resumed.config.layers == calibration.config.layers
    computed = resumed.lc.metadata["layer_evaluations_this_run"]
    assert computed == evaluations_per_sample(calibration.lc) * 4  # only the 4 missing samples
    assert record_ids(out / SAMPLES_FILE) == ids  # one records file again, in sample order
    assert record_files(out, SAMPLES_FILE) == [out / SAMPLES_FILE]


def test_calibration_begun_by_one_process_is_finished_by_two_equal_to_one_process(reference, two_processes):
    calibration, _, _ = reference
    out = two_processes / "cal"
    lc = LCResult.load(out / "lc.json")
    assert_same_lc(lc, calibration.lc)
    assert json.loads((out / "shortv_config.json").read_text())["layers"] == calibration.config.layers
    assert lc.metadata["processes"] == 2
    # Each of the 5 missing samples computed once, by one of the two processes; the 3 recorded ones not again.
    assert lc.metadata["layer_evaluations_this_run"] == evaluations_per_sample(calibration.lc) * (CALIB - 3)
    assert record_ids(out / SAMPLES_FILE) == calibration.lc.sample_ids
    assert record_files(out, SAMPLES_FILE) == [out / SAMPLES_FILE]  # the second process's shard merged


def test_evaluation_with_two_processes_equals_one_process_and_resumes_its_run(reference, two_processes):
    _, summary, one_process = reference
    out = two_processes / "eval"
    expected = [json.loads(line) for line in (one_process / "eval" / PREDICTIONS_FILE).read_text().splitlines()]
    predictions = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert [record["id"] for record in predictions] == [record["id"] for record in expected]  # each once, in order
    assert [record["baseline_seconds"] for record in predictions[:2]] == [1000.0, 1000.0]  # not generated again
    answers = ("id", "type", "answer", "baseline", "shortv", "baseline_correct", "shortv_correct", "text_tokens")
    assert [{key: record[key] for key in answers} for record in predictions] == [
        {key: record[key] for key in answers} for record in expected
    ]
    result, expected_summary = json.loads((out / SUMMARY_JSON).read_text()), summary.to_dict()
    for key in ("num_samples", "agreement", "flops_ratio", "layers", "per_type_counts"):
        assert result[key] == expected_summary[key]
    for key in ("baseline", "shortv"):
        del result[key]["seconds"], expected_summary[key]["seconds"]  # timings differ from run to run
        assert result[key] == expected_summary[key]
    assert record_files(out, PREDICTIONS_FILE) == [out / PREDICTIONS_FILE]
