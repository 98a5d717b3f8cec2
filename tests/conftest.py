"""Fixtures every test file can use.

``device``: where device-aware tests (the parity tests) put their models, from the environment variable
``SHORTV_TEST_DEVICE`` (default ``cpu``), so the same tests run on a GPU::

    SHORTV_TEST_DEVICE=cuda python -m pytest tests/test_parity.py

``tiny_llava_dir``: an untrained tiny LLaVA checkpoint folder (weights and processor), as a user's model folder is.

``one_thread``: torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

``tiny_lmms_eval``: a factory ``(class_name, name, model, processor, **model_args)`` -> the shortv lmms-eval model
(``"ShortV"`` or ``"ShortVChat"``) serving an already built model and processor (e.g. a tiny family's), on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_ENV = "SHORTV_TEST_DEVICE"
# No test reaches a model hub (tiny models are built from configs); offline, a stray hub lookup fails at once instead
# of retrying for ~20 s. Set before any test module imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2` (CI): two workers on two cores, one torch thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def device() -> torch.device:
    requested = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail(f"{DEVICE_ENV}={requested} but torch sees no CUDA device", pytrace=False)
        # fp32 tolerances (1e-5) assume true fp32 products: no TF32 in matmuls or in the vision towers' convolutions.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return requested


@pytest.fixture(scope="session")
def logit_tolerance(device) -> dict[str, float]:
    """fast == reference tolerance for fp32 logits. On a GPU, cuBLAS picks other kernels (other reduction orders)
    for a frozen layer's few text rows than for all rows, so the difference scales with the logit: on an H200 one
    logit of 0.94 of 9800 differed by 1.1e-5 (benchmarks/results/gpu/h200_2026-11-27/parity.txt). The CPU keeps
    the absolute 1e-5."""
    if device.type == "cuda":
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 0.0, "atol": 1e-5}


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    from shortv.tiny import build

    folder = tmp_path_factory.mktemp("tiny_llava")
    torch.manual_seed(0)
    build.build_model(seed=0).save_pretrained(folder)
    build.build_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models gain nothing from threads, and on a shared, loaded CPU they make them ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_lmms_eval(monkeypatch):
    def make(class_name, name, model, processor, **model_args):
        import shortv.integrations.lmms_eval as integration
        from shortv.loading import ModelSource

        from shortv.fingerprint import fingerprint_model

        # The weights' identity from memory: the made-up hub id would otherwise send the fingerprint to the hub
        # (unreachable here: ~23 s of retries per model).
        source = ModelSource(f"tiny-{name}", f"tiny-{name}", model.config, _fingerprint=fingerprint_model(model))
        monkeypatch.setattr(integration, "resolve_model", lambda *args, **kwargs: source)
        monkeypatch.setattr(integration, "load_model", lambda *args, **kwargs: (model, processor, f"tiny-{name}"))
        return getattr(integration, class_name)(pretrained=f"tiny-{name}", device="cpu", **model_args)

    return make
