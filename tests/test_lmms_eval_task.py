"""`write_task`: a shortv JSONL file as a local lmms-eval task (run end to end by tests/test_readme.py)."""

import importlib.util
import json

import pytest
import yaml
from PIL import Image

from shortv.integrations.lmms_eval_task import write_task


def load_utils(path):
    spec = importlib.util.spec_from_file_location("task_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_files_score_as_shortv_eval(tmp_path):
    Image.new("L", (8, 8), 200).save(tmp_path / "a.png")  # grayscale: the task hands lmms-eval RGB, as shortv eval
    rows = [{"id": "q1", "image": "a.png", "prompt": "Which?", "answer": "B", "choices": ["red", "blue"]},
            {"id": "q2", "image": "a.png", "prompt": "Colour?", "answer": "The Red."},
            {"id": "q3", "image": "a.png", "prompt": "Left out by the limit", "answer": "x"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    folder = write_task(data, tmp_path / "task", name="my_vqa", limit=2, max_new_tokens=5)

    task = yaml.load((folder / "my_vqa.yaml").read_text(), Loader=yaml.BaseLoader)  # keeps the !function tags as text
    assert task["task"] == "my_vqa" and task["generation_kwargs"]["max_new_tokens"] == "5"
    docs = [json.loads(line) for line in (folder / "my_vqa.jsonl").read_text().splitlines()]
    assert [doc["id"] for doc in docs] == ["q1", "q2"]
    assert task["dataset_kwargs"]["data_files"]["test"] == str((folder / "my_vqa.jsonl").resolve())

    utils = load_utils(folder / "my_vqa_utils.py")
    assert utils.doc_to_text(docs[0]) == "Which?\nA. red\nB. blue"  # the options as shortv eval shows them
    assert [image.mode for image in utils.doc_to_visual(docs[0])] == ["RGB"]
    assert utils.process_results(docs[0], ["(b) blue"]) == {"exact_match": 1.0}
    assert utils.process_results(docs[0], ["A"]) == {"exact_match": 0.0}
    assert utils.process_results(docs[1], ["red"]) == {"exact_match": 1.0}  # normalized: case, articles, punctuation


def test_a_task_name_must_be_a_module_name(tmp_path):
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        write_task(tmp_path / "data.jsonl", tmp_path / "task", name="my-vqa")
