"""The weights fingerprint: what it sees (safetensors headers, sizes, sampled bytes; shards; pickled .bin; a hub
snapshot's commit; a model in memory), its JSON round trip, and how a difference is named."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shortv.config import ShortVConfig
from shortv.contribution import LCResult
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
    for edited in (original.to_dict(), original.compact().to_dict()):
        edited["files"]["model.safetensors"]["size"] += 1
        with pytest.raises(ValueError, match="digest does not match"):
            WeightsFingerprint.from_dict(edited)
    edited = original.to_dict()
    name = sorted(edited["files"]["model.safetensors"]["tensors"])[0]
    edited["files"]["model.safetensors"]["tensors"][name] += "0"
    with pytest.raises(ValueError, match="a file's digest does not match its tensors"):
        WeightsFingerprint.from_dict(edited)


def test_the_compact_form_is_the_same_identity_and_names_files(tiny_llava_dir, copy):
    """Configs and LC files record the compact form: equal to the full one (same digest), and a difference names the
    file (the size when it changed); two full ones name the tensors."""
    original = fingerprint_folder(tiny_llava_dir)
    compact = WeightsFingerprint.from_dict(json.loads(json.dumps(original.compact().to_dict())))
    assert compact == original and compact.digest == original.digest and compact.label() == original.label()
    assert set(compact.to_dict()["files"]["model.safetensors"]) == {"size", "digest"}
    assert describe_difference(compact, original) == describe_difference(original, compact) == ""
    tensors = tensors_of(copy)
    name = "language_model.model.layers.3.mlp.up_proj.weight"
    tensors[name] = tensors[name] + 1e-3
    resave(copy, tensors)
    changed = fingerprint_folder(copy)
    assert changed != compact and changed.compact() != compact
    assert describe_difference(compact, changed) == "model.safetensors: header or sampled bytes differ"
    assert describe_difference(compact, changed.compact()) == "model.safetensors: header or sampled bytes differ"
    assert describe_difference(original, changed) == f"model.safetensors: sampled bytes of tensor {name}"
    tensors[name] = tensors[name][:, :-1].contiguous()
    resave(copy, tensors)
    size = (copy / "model.safetensors").stat().st_size
    assert describe_difference(compact, fingerprint_folder(copy)) == \
        f"model.safetensors: size {original.files['model.safetensors'].size} before, {size} now"


def test_configs_and_lc_files_record_a_small_fingerprint(tmp_path):
    """A many-tensor sharded checkpoint (700 tensors, 3 shards and an index, as 7B weights are stored): its full
    fingerprint is tens of kB; a config and an LC file record under 2 kB of it, and read back as the same weights."""
    folder = tmp_path / "many"
    folder.mkdir()
    weight_map = {}
    for shard in range(3):
        name = f"model-{shard + 1:05d}-of-00003.safetensors"
        part = {f"model.layers.{index}.weight": torch.full((4, 4), float(index)) for index in range(shard, 700, 3)}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    full = fingerprint_folder(folder)
    assert len(json.dumps(full.to_dict())) > 40_000
    config = ShortVConfig(layers=[1, 2], provenance={"weights": full.to_dict()})
    assert len(json.dumps(config.to_dict()["provenance"]["weights"])) < 2_000
    assert ShortVConfig.load(config.save(tmp_path / "shortv_config.json")).weights == full
    lc = LCResult(num_layers=2, token_types=("visual",), sample_ids=["s"], per_sample={"visual": [[0.1, 0.2]]},
                  weights=full)
    recorded = json.loads(lc.save(tmp_path / "lc.json").read_text())["weights"]
    assert len(json.dumps(recorded)) < 2_000 and LCResult.load(tmp_path / "lc.json").weights == full


def test_full_fingerprints_of_the_first_format_still_load(tiny_llava_dir, tmp_path):
    """The first version recorded every tensor in configs and LC files, with a digest over all of them."""
    full = fingerprint_folder(tiny_llava_dir)
    files = {name: {"size": entry.size, "header": entry.header, "tensors": entry.tensors}
             for name, entry in full.files.items()}
    body = json.dumps(["files", None, None, files], sort_keys=True)
    first = {"kind": "files", "digest": hashlib.sha256(body.encode()).hexdigest(), "repo": None, "revision": None,
             "files": files}
    path = tmp_path / "shortv_config.json"
    path.write_text(json.dumps({"layers": [3], "provenance": {"model_id": "m", "weights": first}}))
    config = ShortVConfig.load(path)
    assert config.weights == full and set(config.provenance["weights"]["files"]["model.safetensors"]) == {"size",
                                                                                                       "digest"}
    first["files"]["model.safetensors"]["size"] += 1
    with pytest.raises(ValueError, match="digest does not match"):
        WeightsFingerprint.from_dict(first)


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
