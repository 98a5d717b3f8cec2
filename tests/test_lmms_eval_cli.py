"""lmms-eval's own command line with ``--model shortv``, end to end, on a local task made from the embedded test split,
run as lmms-eval runs data-parallel: two processes (``torchrun``; on CPU the model's accelerator joins them as a gloo
group), each answering its share of the questions.

The task is `shortv.integrations.lmms_eval_task.write_task`'s. lmms-eval exits 0 even when a model crashes
mid-evaluation (a model that cannot be built is the exception: see the last test), so the test reads the results it
wrote: every question answered once, each answer the one `shortv eval`'s generation gives in one process with the
same ShortV layers, and the metric agreeing. Needs the CLI's install (README, "lmms-eval": ``.[lmms-eval-cpu]`` and ``--no-deps
lmms-eval==0.7.3``). The single-process model is tested in ``test_lmms_eval.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import shortv

pytest.importorskip("lmms_eval")

from shortv import ShortVConfig, apply_shortv  # noqa: E402
from shortv.data import read_jsonl  # noqa: E402
from shortv.evaluation import generate_answers, is_correct  # noqa: E402
from shortv.integrations.lmms_eval_task import write_task  # noqa: E402
from shortv.tiny import embedded_split_path, load_embedded  # noqa: E402

QUESTIONS = 8
LAYERS = [6, 7, 8, 9, 10, 11]
TASK = "shortv_tiny_vqa"
REPO = Path(shortv.__file__).resolve().parents[1]


def expected_answers(samples) -> list[str]:
    model, processor = load_embedded()
    apply_shortv(model, ShortVConfig(LAYERS))
    return generate_answers(model, processor, samples, max_new_tokens=8)[0]


def test_lmms_eval_cli_runs_shortv_in_two_processes_on_a_local_task(tmp_path):
    samples = read_jsonl(embedded_split_path("test"), require_answer=True)[:QUESTIONS]
    task_dir = write_task(embedded_split_path("test"), tmp_path / "task", name=TASK, limit=QUESTIONS)
    config = ShortVConfig(LAYERS).save(tmp_path / "shortv_config.json")
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmms_eval",
               "--model", "shortv", "--model_args", f"shortv_config={config},device=cpu",
               "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "4",
               "--output_path", str(out), "--log_samples"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    log = textwrap.shorten(run.stdout + run.stderr, 4000, placeholder=" ... ")
    assert run.returncode == 0, log

    [results_file] = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"][TASK] == {"original": QUESTIONS, "effective": QUESTIONS}, log
    [samples_file] = out.rglob(f"*_samples_{TASK}.jsonl")
    logged = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert [record["doc_id"] for record in logged] == list(range(QUESTIONS)), log  # every question answered once
    assert "Running on rank 1" in run.stdout + run.stderr  # by two processes

    expected = expected_answers(samples)
    answers = [record["filtered_resps"] for record in logged]
    answers = [answer[0] if isinstance(answer, list) else answer for answer in answers]
    assert answers == expected  # the same ShortV model, through lmms-eval's prompts and batching
    accuracy = sum(is_correct(a, s) for a, s in zip(answers, samples)) / QUESTIONS  # scored as shortv eval
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(accuracy)
    assert accuracy >= 0.5  # the trained tiny model answers most of them (93.7% on the whole test split)


def test_lmms_eval_cli_exits_nonzero_when_the_model_cannot_be_built(tmp_path):
    """lmms-eval catches every Exception of a run and exits 0; the shortv model's build failures still reach the
    exit status, with one line naming the cause (here a config made for a 40-layer model)."""
    config = tmp_path / "shortv_config.json"
    ShortVConfig(list(range(30, 40)), provenance={"order": list(range(40)), "model_id": "other/model"}).save(config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "lmms_eval", "--model", "shortv", "--model_args", f"shortv_config={config}",
               "--tasks", "mme", "--batch_size", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 1, textwrap.shorten(run.stdout + run.stderr, 4000)
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("shortv: the lmms-eval model was not built: ") and "shortv_config.json" in last
