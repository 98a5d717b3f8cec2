import json

import pytest

from shortv import ShortVConfig
from shortv.config import PRESET_LAYER_ORDERS


def test_json_round_trip(tmp_path):
    config = ShortVConfig(layers=[5, 1, 3], mode="reference", provenance={"lc": "lc.json", "n": 3})
    path = config.save(tmp_path / "sub" / "shortv_config.json")
    assert json.loads(path.read_text())["layers"] == [5, 1, 3]
    loaded = ShortVConfig.load(path)
    assert loaded == config
    assert loaded.frozen_layers == frozenset({1, 3, 5})


def test_default_is_fast_and_empty():
    config = ShortVConfig()
    assert config.layers == [] and config.mode == "fast" and config.version == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layers": [1, 2, 1]}, ValueError, "lists layer 1 more than once"),
        ({"layers": [-1]}, ValueError, "must be >= 0"),
        ({"layers": [1.0]}, TypeError, "must contain integers"),
        ({"layers": [True]}, TypeError, "must contain integers"),
        ({"layers": "12"}, TypeError, "must be a list of layer indices"),
        ({"mode": "turbo"}, ValueError, "mode must be one of ('fast', 'reference')"),
        ({"version": 99}, ValueError, "format version 99 is not supported"),
    ],
)
def test_validation_messages(kwargs, error, message):
    with pytest.raises(error) as excinfo:
        ShortVConfig(**kwargs)
    assert message in str(excinfo.value)


def test_load_rejects_unknown_fields_and_bad_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [1], "layer_count": 3}))
    with pytest.raises(ValueError, match="unknown ShortV config field"):
        ShortVConfig.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json:1: not valid JSON"):
        ShortVConfig.load(bad)


def test_presets_take_first_n_of_published_order():
    config = ShortVConfig.from_preset("llava-hf/llava-1.5-7b-hf", n=5)
    assert config.layers == [31, 29, 30, 28, 0]
    assert config.provenance == {"preset": "llava-hf/llava-1.5-7b-hf", "n": 5}
    assert ShortVConfig.from_preset("llava-1.5-7b").layers == list(PRESET_LAYER_ORDERS["llava-hf/llava-1.5-7b-hf"])
    assert len(ShortVConfig.from_preset("llava-hf/llava-1.5-13b-hf", n=24).layers) == 24
    assert ShortVConfig.from_preset("llava-next-13b", n=3).layers == [39, 32, 29]
    # every published order is a valid config: no duplicates, 19 for 7B (32 layers), 24 for 13B (40 layers)
    for hub_id, order in PRESET_LAYER_ORDERS.items():
        assert len(set(order)) == len(order)
        assert max(order) < (40 if "13b" in hub_id else 32)


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown ShortV preset 'llava-2'; known presets:"):
        ShortVConfig.from_preset("llava-2")
    with pytest.raises(ValueError, match="publishes 19 layers; n must be in 0..19, got 20"):
        ShortVConfig.from_preset("llava-1.5-7b", n=20)


def test_text_frozen_ablation_is_reference_only_and_round_trips(tmp_path):
    config = ShortVConfig(layers=[2], mode="reference", frozen_tokens="text")
    assert ShortVConfig.load(config.save(tmp_path / "c.json")) == config
    with pytest.raises(ValueError, match="runs with mode='reference'"):
        ShortVConfig(layers=[2], frozen_tokens="text")
    with pytest.raises(ValueError, match="frozen_tokens must be one of"):
        ShortVConfig(layers=[2], mode="reference", frozen_tokens="image")


def test_numpy_layer_lists_are_accepted_as_python_ints(tmp_path):
    import numpy as np

    from shortv import LCResult, select_layers

    for layers in (np.array([3, 1, 2]), [np.int64(3), np.int32(1), 2], (np.uint8(3), 1, np.int16(2))):
        config = ShortVConfig(layers)
        assert config.layers == [3, 1, 2] and all(type(index) is int for index in config.layers)
        assert ShortVConfig.load(config.save(tmp_path / "c.json")) == config  # and JSON-serialisable
    assert ShortVConfig.coerce(np.arange(2)).layers == [0, 1]
    with pytest.raises(TypeError, match=r"must contain integers, got np.True_"):
        ShortVConfig(np.array([True, False]))
    lc = LCResult(num_layers=3, token_types=("visual",), sample_ids=["a"], per_sample={"visual": [[0.3, 0.1, 0.2]]})
    assert select_layers(lc, n=np.int64(2)).layers == [1, 2]
