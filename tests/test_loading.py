"""Loading checkpoints: broken weight files are named, and a model folder's own code never runs unasked."""

import shutil

import pytest
from broken_models import remote_code_folder, unpicklable_bin
from transformers import LlavaConfig

from shortv.loading import load_model, model_id_of, resolve_model


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model")


def test_loads_and_reads_facts_from_the_config(tiny_llava_dir, monkeypatch):
    source = resolve_model(str(tiny_llava_dir))
    assert source.num_layers == 12 and source.context_length == 512 and source.model_id == str(tiny_llava_dir)
    monkeypatch.chdir(tiny_llava_dir.parent)
    assert resolve_model(tiny_llava_dir.name).model_id == str(tiny_llava_dir)  # relative path: the same id
    model, processor, model_id = load_model(tiny_llava_dir.name)
    assert model_id == str(tiny_llava_dir) and not model.training and processor.image_token == "<image>"
    assert model_id_of(model) == model_id  # a loaded model is named as its folder, however it was written


def test_truncated_safetensors_is_named(tiny_llava_dir, tmp_path):
    folder = copy_of(tiny_llava_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model/model.safetensors: not a valid safetensors file \(.*\); "
                                         r"re-download or re-save the model"):
        load_model(folder)


def test_unloadable_bin_tiny_llava_dir_is_named(tiny_llava_dir, tmp_path):
    folder = copy_of(tiny_llava_dir, tmp_path)
    unpicklable_bin(folder)
    with pytest.raises(ValueError, match=r"model/pytorch_model.bin: not a loadable PyTorch checkpoint"):
        load_model(folder)


def test_a_folders_own_code_runs_only_when_trusted(tmp_path):
    folder, marker = remote_code_folder(tmp_path)
    with pytest.raises(ValueError, match=r"custom contains custom code .* unless you pass --trust-remote-code"):
        resolve_model(folder)
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_model(folder)
    assert not marker.exists()
    assert resolve_model(folder, trust_remote_code=True).num_layers == LlavaConfig().text_config.num_hidden_layers
    assert marker.exists()


def test_missing_model_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        resolve_model(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text('{"model_type": "llava", ')
    with pytest.raises(ValueError, match=r"config.json: cannot read the model config"):
        resolve_model(tmp_path)
