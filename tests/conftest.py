"""Fixtures shared by several test files."""

import pytest
import torch

from shortv.tiny import build


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """An untrained tiny LLaVA checkpoint folder (weights and processor), as a user's model folder is."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    torch.manual_seed(0)
    build.build_model(seed=0).save_pretrained(folder)
    build.build_processor().save_pretrained(folder)
    return folder
