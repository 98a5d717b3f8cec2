"""``generate(..., use_cache=False)`` with an explicit ``visual_mask`` on bare LMs: without a cache every step re-runs
the whole sequence, so the prompt's mask grows with it (generated tokens are text), in fast and reference mode."""

import pytest
import torch
from tiny_models import build_inputs, build_model, default_layouts

from shortv import ShortVConfig, apply_shortv, disable_shortv

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


def greedy_oracle(model, input_ids, prompt_mask, steps):
    """Greedy decoding the slow way: each step one forward over the whole sequence, with a per-call mask (the prompt's
    mask, then text for every generated token); returns the tokens and the last step's logits."""
    ids = input_ids
    for _ in range(steps):
        mask = torch.cat([prompt_mask, prompt_mask.new_zeros(ids.shape[0], ids.shape[1] - prompt_mask.shape[1])], 1)
        logits = model(input_ids=ids, visual_mask=mask).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_uncached_generate_grows_the_visual_mask(family, mode):
    model = build_model(family, init_std=0.2)
    inputs = build_inputs(model, family, batch_layouts=default_layouts(family, batch_size=1))
    input_ids, mask = inputs["input_ids"], inputs.visual_mask
    assert bool(mask.any()) and not bool(mask.all())
    apply_shortv(model, ShortVConfig(layers=[1, 2], mode=mode))
    with torch.no_grad():
        uncached = model.generate(input_ids=input_ids, visual_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                  use_cache=False)
        cached = model.generate(input_ids=input_ids, visual_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                use_cache=True)
        expected, logits = greedy_oracle(model, input_ids, mask, STEPS)
        with disable_shortv(model):
            unpatched = model(input_ids=expected[:, :-1]).logits[:, -1]
    assert torch.equal(uncached, expected) and torch.equal(cached, expected)
    assert (logits - unpatched).abs().max() > 1e-3  # ShortV changed the model's output: the test can fail
    # The prompt itself must still be covered: a mask shorter than the prompt is refused, not padded with text.
    with pytest.raises(ValueError, match=r"visual_mask covers \d+ positions but the prompt has \d+ tokens"):
        model.generate(input_ids=input_ids, visual_mask=mask[:, :-1], max_new_tokens=1, use_cache=False)
