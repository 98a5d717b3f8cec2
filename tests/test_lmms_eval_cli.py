"""lmms-eval's own command line with ``--model shortv``, end to end, on a local task made from the embedded test split,
run as lmms-eval runs data-parallel: two processes (``torchrun``; on CPU the model's accelerator joins them as a gloo
group), each answering its share of the questions.

The tasks are `shortv.integrations.lmms_eval_task.write_task`'s. lmms-eval exits 0 even when a model crashes
mid-evaluation (a model that cannot be built is the exception: see the last test), so the tests read the results it
wrote: every question answered once, each answer the one `shortv eval`'s generation gives in one process with the
same ShortV layers, and the metric agreeing. A second test runs a local multiple-choice task (``output_type:
multiple_choice``, scored by ``loglikelihood``) and checks its accuracy against the choices' losses computed here with
ShortV's reference mode. Needs the CLI's install (README, "lmms-eval": ``.[lmms-eval-cpu]`` and ``--no-deps
lmms-eval==0.7.3``). The single-process model is tested in ``test_lmms_eval.py`` and ``test_lmms_eval_rest.py``.
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
from shortv.tiny import embedded_split_path, load_embedded, synthetic  # noqa: E402

QUESTIONS = 8
LAYERS = [6, 7, 8, 9, 10, 11]
TASK = "shortv_tiny_vqa"
REPO = Path(shortv.__file__).resolve().parents[1]

MC_TASK = "shortv_tiny_mc"
MC_QUESTIONS = 12


def run_lmms_eval(tmp_path: Path, *args: str, processes: int = 1):
    """lmms-eval's command line, offline (``processes`` > 1: under torchrun); (completed run, shortened log)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    run = subprocess.run([sys.executable, *launcher, "-m", "lmms_eval", *args], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    return run, textwrap.shorten(run.stdout + run.stderr, 4000, placeholder=" ... ")


def read_results(out: Path, task: str, count: int, log: str) -> tuple[dict, list[dict]]:
    """The results file and the per-document records (by doc_id), after checking every document was answered."""
    [results_file] = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"][task] == {"original": count, "effective": count}, log
    [samples_file] = out.rglob(f"*_samples_{task}.jsonl")
    logged = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert [record["doc_id"] for record in logged] == list(range(count)), log  # every question answered once
    return results, logged


def expected_answers(samples) -> list[str]:
    model, processor = load_embedded()
    apply_shortv(model, ShortVConfig(LAYERS))
    return generate_answers(model, processor, samples, max_new_tokens=8)[0]


def test_lmms_eval_cli_runs_shortv_in_two_processes_on_a_local_task(tmp_path):
    samples = read_jsonl(embedded_split_path("test"), require_answer=True)[:QUESTIONS]
    task_dir = write_task(embedded_split_path("test"), tmp_path / "task", name=TASK, limit=QUESTIONS)
    config = ShortVConfig(LAYERS).save(tmp_path / "shortv_config.json")
    out = tmp_path / "results"
    run, log = run_lmms_eval(tmp_path, "--model", "shortv", "--model_args", f"shortv_config={config},device=cpu",
                             "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "4",
                             "--output_path", str(out), "--log_samples", processes=2)
    assert run.returncode == 0, log
    results, logged = read_results(out, TASK, QUESTIONS, log)
    assert "Running on rank 1" in run.stdout + run.stderr  # by two processes

    expected = expected_answers(samples)
    answers = [record["filtered_resps"] for record in logged]
    answers = [answer[0] if isinstance(answer, list) else answer for answer in answers]
    assert answers == expected  # the same ShortV model, through lmms-eval's prompts and batching
    accuracy = sum(is_correct(a, s) for a, s in zip(answers, samples)) / QUESTIONS  # scored as shortv eval
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(accuracy)
    assert accuracy >= 0.5  # the trained tiny model answers most of them (93.7% on the whole test split)


def choice_losses(model, processor, sample, choices):
    """Each choice's mean loss after the sample's prompt (its own forward per choice, batch of one)."""
    import torch
    from PIL import Image

    with Image.open(sample.images[0]) as image:
        images = [image.convert("RGB")]
    content = [{"type": "image"}, {"type": "text", "text": sample.prompt}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_length = processor(images=images, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    losses = []
    for choice in choices:
        inputs = processor(images=images, text=f"{prompt} {choice}", return_tensors="pt")
        with torch.no_grad():
            log_probs = model(**inputs).logits[0, prompt_length - 1 : -1].log_softmax(-1)
        targets = inputs["input_ids"][0, prompt_length:]
        losses.append(float(-log_probs.gather(-1, targets[:, None]).mean()))
    return losses


def test_lmms_eval_cli_scores_a_local_multiple_choice_task(tmp_path):
    samples = read_jsonl(embedded_split_path("test"), require_answer=True)[:MC_QUESTIONS]
    rows = [{"id": s.id, "prompt": s.prompt, "answer": s.answer, "choices": list(synthetic.ANSWERS[s.type]),
             "image": str(s.images[0].resolve())} for s in samples]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task_dir = write_task(data, tmp_path / "task", name=MC_TASK, multiple_choice=True)
    config = ShortVConfig(LAYERS).save(tmp_path / "shortv_config.json")
    out = tmp_path / "results"
    run, log = run_lmms_eval(tmp_path, "--model", "shortv", "--force_simple", "--model_args",
                             f"shortv_config={config},device=cpu", "--tasks", MC_TASK, "--include_path", str(task_dir),
                             "--batch_size", "8", "--output_path", str(out), "--log_samples")
    assert run.returncode == 0, log
    results, logged = read_results(out, MC_TASK, MC_QUESTIONS, log)

    # Independently: the same ShortV layers in reference mode, one forward per choice.
    model, processor = load_embedded()
    apply_shortv(model, ShortVConfig(LAYERS, mode="reference"))
    correct = []
    for sample, row, record in zip(samples, rows, logged):
        losses = choice_losses(model, processor, sample, row["choices"])
        logged_losses = [float(loss) for loss, _ in record["filtered_resps"]]  # one (loss, is_greedy) per choice
        assert logged_losses == pytest.approx(losses, abs=1e-4), (sample.id, log)
        correct.append(min(range(len(losses)), key=losses.__getitem__) == row["choices"].index(row["answer"]))
    accuracy = sum(correct) / MC_QUESTIONS
    assert results["results"][MC_TASK]["acc,none"] == pytest.approx(accuracy)
    assert accuracy >= 0.5  # the trained tiny model picks most answers (chance: 2 to 5 choices)


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
