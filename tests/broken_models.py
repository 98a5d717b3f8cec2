"""Model folders that loading must refuse with a clear message, shared by the loading tests of every command."""

import json

from transformers import LlavaConfig


def corrupt_safetensors(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def unpicklable_bin(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle" * 10)


def remote_code_folder(tmp_path):
    """(folder whose config.json needs its own Python code, file that code creates when it runs)."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    config = LlavaConfig().to_dict()
    config.update(model_type="custom_llava", auto_map={"AutoConfig": "configuration_custom.CustomLlavaConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlavaConfig\n\n\n"
        "class CustomLlavaConfig(LlavaConfig):\n    model_type = 'custom_llava'\n"
    )
    return folder, marker
