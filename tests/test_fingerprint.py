"""The weights fingerprint: what it sees (safetensors headers, sizes, sampled bytes; shards; pickled .bin; a hub
snapshot's commit; a model in memory), its JSON round trip, and how a difference is named."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shortv.fingerprint import (
    WeightsFingerprint,
    describe_difference,
    fingerprint_folder,
    fingerprint_hub,
    fingerprint_model,
)
from shortv.loading import resolve_model
from shortv.tiny import build


def tensors_of(folder):
    return load_file(folder / "model.safetensors")


def resave(folder, tensors):
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def copy(tiny_llava_dir, tmp_path):
    return shutil.copytree(tiny_llava_dir, tmp_path / "a" / "checkpoint")


def test_same_bytes_same_fingerprint_and_json_round_trip(tiny_llava_dir, copy):
    original = fingerprint_folder(tiny_llava_dir)
    assert fingerprint_folder(copy) == original  # a copy, elsewhere, is the same weights
    assert WeightsFingerprint.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    entry = original.files["model.safetensors"]
    assert entry.size == (tiny_llava_dir / "model.safetensors").stat().st_size and len(entry.tensors) > 100
    assert describe_difference(original, original) == ""
    edited = original.to_dict()
    edited["files"]["model.safetensors"]["size"] += 1
    with pytest.raises(ValueError, match="digest does not match"):
        WeightsFingerprint.from_dict(edited)


def test_a_changed_tensor_is_named(tiny_llava_dir, copy):
    original = fingerprint_folder(tiny_llava_dir)
    tensors = tensors_of(copy)
    name = "language_model.model.layers.3.mlp.up_proj.weight"
    tensors[name] = tensors[name] + 1e-3  # every value moves, the shapes and the file size do not
    resave(copy, tensors)
    changed = fingerprint_folder(copy)
    assert changed.files["model.safetensors"].size == original.files["model.safetensors"].size
    assert describe_difference(original, changed) == f"model.safetensors: sampled bytes of tensor {name}"

    tensors[name] = tensors[name][:, :-1].contiguous()  # a shape changes: header, size and every later offset
    resave(copy, tensors)
    message = describe_difference(original, fingerprint_folder(copy))
    assert message.startswith("model.safetensors: size ") and f"dtype, shape or position of tensors {name}" in message
    assert "more" in message  # the tensors stored after it moved too: the first few are named, then a count

    (copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match=r"checkpoint/model.safetensors: not a valid safetensors file \(its header "
                                         r"is not JSON\); re-download or re-save the model"):
        fingerprint_folder(copy)


def test_sharded_checkpoint_and_pickled_bin(tmp_path):
    torch.manual_seed(0)
    model = build.build_model(seed=0)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    fingerprint = fingerprint_folder(sharded)
    assert len(shards) > 2
    assert set(fingerprint.files) == {path.name for path in shards} | {"model.safetensors.index.json"}
    last = load_file(shards[-1])
    name = sorted(last)[0]
    last[name] = last[name] * 2 + 1
    save_file(last, shards[-1], metadata={"format": "pt"})
    assert describe_difference(fingerprint, fingerprint_folder(sharded)) == \
        f"{shards[-1].name}: sampled bytes of tensor {name}"
    shards[0].unlink()
    assert f"{shards[0].name} no longer there" in describe_difference(fingerprint, fingerprint_folder(sharded))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    torch.save(state, pickled / "pytorch_model.bin")
    before = fingerprint_folder(pickled)
    assert len(before.files["pytorch_model.bin"].tensors) == len(state)
    changed = next(key for key in sorted(state) if key.endswith("up_proj.weight"))
    state[changed] = state[changed] - 1
    torch.save(state, pickled / "pytorch_model.bin")
    assert describe_difference(before, fingerprint_folder(pickled)) == \
        f"pytorch_model.bin: sampled bytes of tensor {changed}"


def test_a_model_in_memory_is_fingerprinted_from_its_tensors():
    torch.manual_seed(0)
    model = build.build_model(seed=0)
    before = fingerprint_model(model)
    assert before.kind == "memory" and fingerprint_model(model) == before
    name, parameter = next(iter(model.named_parameters()))
    with torch.no_grad():
        parameter.add_(0.5)
    assert describe_difference(before, fingerprint_model(model)) == f"(memory): sampled bytes of tensor {name}"
    assert "cannot be compared" in describe_difference(before, WeightsFingerprint("files"))


def test_a_hub_model_is_its_snapshot_commit(tiny_llava_dir, tmp_path, monkeypatch):
    """An offline hub cache laid out as huggingface_hub writes it: the identity is the commit of the snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--owner--tiny"
    shutil.copytree(tiny_llava_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub.HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    fingerprint = fingerprint_hub("owner/tiny")
    assert (fingerprint.kind, fingerprint.repo, fingerprint.revision) == ("hub", "owner/tiny", commit)
    assert resolve_model("owner/tiny").fingerprint == fingerprint
    assert fingerprint.label() == f"hub owner/tiny@{commit[:12]}"
    other = WeightsFingerprint("hub", repo="owner/tiny", revision="f" * 40)
    assert describe_difference(fingerprint, other) == f"owner/tiny: revision {commit} before, {'f' * 40} now"


def test_a_library_run_on_a_model_object_resumes_only_with_the_same_tensors(tmp_path):
    """No files: the run records the memory fingerprint; changed tensors are refused on resume, unchanged resume."""
    from tiny_models import build_inputs, build_model

    from shortv.contribution import RUN_FILE, SAMPLES_FILE, CalibrationSample, layer_contribution

    model = build_model("llama", init_std=0.2)
    samples = []
    for index in range(2):
        inputs = build_inputs(model, "llama", batch_layouts=[dict(n_text_before=3, images=1, n_text_after=4)],
                              seed=index)
        samples.append(CalibrationSample(id=f"s{index}", inputs=dict(inputs), visual_mask=inputs.visual_mask))
    first = layer_contribution(model, samples[:1], out_dir=tmp_path, progress=False)
    assert first.weights == fingerprint_model(model)
    assert json.loads((tmp_path / RUN_FILE).read_text())["weights"] == first.weights.to_dict()
    records = (tmp_path / SAMPLES_FILE).read_bytes()
    name, parameter = next(iter(model.named_parameters()))
    original = parameter.detach().clone()
    with torch.no_grad():
        parameter.mul_(1.5)
    with pytest.raises(ValueError, match=rf"cannot resume .*: the weights differ from the interrupted run's "
                                         rf"\(\(memory\): sampled bytes of tensor {name}\)"):
        layer_contribution(model, samples, out_dir=tmp_path, resume=True, progress=False)
    assert (tmp_path / SAMPLES_FILE).read_bytes() == records
    with torch.no_grad():
        parameter.copy_(original)
    assert fingerprint_model(model) == first.weights
    resumed = layer_contribution(model, samples, out_dir=tmp_path, resume=True, progress=False)
    assert resumed.sample_ids == ["s0", "s1"] and resumed.per_sample["visual"][0] == first.per_sample["visual"][0]
