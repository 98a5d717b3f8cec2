"""ShortV on a tiny random LLaVA built from configs: runs anywhere, offline, in seconds.

    python examples/quickstart.py
"""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from shortv import ShortVConfig, apply_shortv, disable_shortv, remove_shortv

IMAGE_TOKEN = 99
torch.manual_seed(0)
config = LlavaConfig(
    vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=4),
    text_config=LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2),
    image_token_index=IMAGE_TOKEN,
)
model = LlavaForConditionalGeneration(config).eval()

# Two prompts of different lengths, left-padded; the image sits at a different position in each.
# The processor normally expands <image> to one token per visual feature: 64 patches of a 32x32 image.
first = [5, 6, 7] + [IMAGE_TOKEN] * 64 + [8, 9, 10, 11]
second = [5] + [IMAGE_TOKEN] * 64 + [12, 13, 14, 15, 16, 17]
width = max(len(first), len(second))
input_ids = torch.tensor([[0] * (width - len(p)) + p for p in (first, second)])
attention_mask = (torch.arange(width)[None] >= torch.tensor([[width - len(first)], [width - len(second)]])).long()
inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(2, 3, 32, 32))

with torch.no_grad():
    apply_shortv(model, ShortVConfig(layers=[3, 4, 5], mode="reference"))  # the slow oracle
    reference = model(**inputs).logits[:, -1]
    apply_shortv(model, ShortVConfig(layers=[3, 4, 5]))  # fast: replaces the previous config
    fast = model(**inputs).logits[:, -1]
    with disable_shortv(model):
        baseline = model(**inputs).logits[:, -1]
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    remove_shortv(model)
    restored = model(**inputs).logits[:, -1]

print(f"fast vs reference max |diff|: {(fast - reference).abs().max().item():.2e}")
print(f"ShortV vs baseline max |diff|: {(fast - baseline).abs().max().item():.2e}  (freezing changes the output)")
print(f"after remove_shortv, identical to baseline: {torch.equal(restored, baseline)}")
print(f"generated with ShortV: {tokens[:, width:].tolist()}")
