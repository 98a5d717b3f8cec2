"""An lmms-eval task made from a shortv JSONL file (the format of ``shortv eval``), so that ``lmms-eval --model shortv``
runs on local data, offline, and scores answers exactly as ``shortv eval`` does.

>>> write_task("test.jsonl", "my_task", name="my_vqa")        # then:
>>> # lmms-eval --model shortv --tasks my_vqa --include_path my_task ...

It writes three files into the folder: ``NAME.yaml`` (the task), ``NAME_utils.py`` (images, prompt, scoring through
`shortv.evaluation.is_correct`) and ``NAME.jsonl`` (the questions, with absolute image paths). Generation is greedy
with ``max_new_tokens`` as in ``shortv eval``. With ``multiple_choice=True`` the task is lmms-eval's
``multiple_choice`` instead: every question's ``choices`` are scored by ``loglikelihood`` after the plain prompt
(run it with ``--force_simple``), and ``acc`` counts the questions whose answer has the lowest loss. This module does
not import lmms-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import read_jsonl
from ..files import output_folder

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_visual: !function {name}_utils.doc_to_visual
doc_to_target: answer
metadata:
  - version: 0.0
"""

GENERATION_YAML = """\
output_type: generate_until
doc_to_text: !function {name}_utils.doc_to_text
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function {name}_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MULTIPLE_CHOICE_YAML = """\
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''\
"""Written by shortv.integrations.lmms_eval_task: a shortv JSONL file as an lmms-eval task."""

from pathlib import Path

from PIL import Image

from shortv.data import VQASample, to_rgb
from shortv.evaluation import is_correct


def _sample(doc):
    return VQASample(id=doc["id"], images=[Path(p) for p in doc["images"]], prompt=doc["prompt"],
                     answer=doc["answer"], choices=doc.get("choices"))


def doc_to_visual(doc):
    images = []
    for path in doc["images"]:
        with Image.open(path) as image:
            images.append(to_rgb(image))
    return images


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    letters = "".join(f"\\n{chr(65 + i)}. {choice}" for i, choice in enumerate(doc.get("choices") or []))
    return doc["prompt"] + letters


def process_results(doc, results):
    return {"exact_match": float(is_correct(results[0], _sample(doc)))}
'''


def write_task(data: str | Path, folder: str | Path, name: str = "shortv_vqa", limit: int | None = None,
               max_new_tokens: int = 8, multiple_choice: bool = False) -> Path:
    """Write the task ``name`` for the first ``limit`` questions of ``data`` (all by default) into ``folder``, and
    return the folder (lmms-eval's ``--include_path``). Every question needs an answer (among its ``choices`` for a
    multiple-choice task); images are checked here."""
    if not name.isidentifier():
        raise ValueError(f"task name {name!r}: use letters, digits and underscores (it names a Python module)")
    samples = read_jsonl(data, require_answer=True)[:limit]
    unscorable = [s.id for s in samples if multiple_choice and s.answer not in (s.choices or [])]
    if unscorable:
        raise ValueError(f"{data}: a multiple-choice task needs each answer among its question's 'choices'; not so "
                         f"for {', '.join(map(str, unscorable[:3]))}" + (" ..." if len(unscorable) > 3 else ""))
    folder = output_folder(folder)
    rows = [{"id": s.id, "prompt": s.prompt, "answer": s.answer, "images": [str(p.resolve()) for p in s.images],
             **({"choices": s.choices} if s.choices else {})} for s in samples]
    questions = folder / f"{name}.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    body = MULTIPLE_CHOICE_YAML if multiple_choice else GENERATION_YAML
    (folder / f"{name}.yaml").write_text(
        (TASK_YAML + body).format(name=name, data=json.dumps(str(questions.resolve())), max_new_tokens=max_new_tokens),
        encoding="utf-8")
    (folder / f"{name}_utils.py").write_text(TASK_UTILS, encoding="utf-8")
    return folder
