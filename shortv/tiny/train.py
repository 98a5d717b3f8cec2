"""Train the embedded tiny LLaVA from scratch on synthetic visual QA (CPU).

    python -m shortv.tiny.train --out runs/tiny [--seed 0] [--threads 1]

Two stages, as in LLaVA:

1. *Vision pre-training* (stands in for a pretrained CLIP): the vision tower
   learns, per patch, which object (colour and shape) is in the patch's own
   cell (a throw-away linear head; see :func:`patch_targets`).  The tower has
   no absolute position embeddings (CLIP's table stays at zero, see
   :func:`~shortv.tiny.build.build_model`), so a patch's features say *what*
   is there and nothing about *where*, and nothing about the rest of the
   scene.  The projector's first layer is then re-parameterised to see
   standardised vision features.
2. *Visual instruction tuning*: the vision tower is frozen; projector and
   language model learn from multi-turn conversations about each image
   (``USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: ...``,
   questions of all types plus "Describe the image."); the loss is taken on
   answer tokens (and their ``</s>``) only.  The first turn of every
   conversation is exactly the single-turn format used at test time.

So the language model has to do part of the visual processing itself, as
real MLLMs do: where each object is (and so what is at a position, what is in
a row, what lies left of what) is known only from the order of the visual
tokens, and it works that out on the visual tokens before the question reads
them.

The language model is trained with 8 decoder layers and deepened to 12 at
``--grow-at`` (step 2400 of 3000) by inserting identity-initialised layers
between the trained ones (progressive stacking, :func:`grow_depth`); the
shallow phase is cheaper per step, which is where a CPU budget gets past the
early plateau.  (With 4 trained layers the model learns faster, but its text
work then sits in so few layers that freezing text tokens barely hurts; see
``benchmarks/results/embedded_recipes.md``.)

AdamW with linear warm-up and cosine decay; everything is seeded, and the data
order is a pure function of ``(seed, step)``.

At the end the model is evaluated on the test split (greedy decoding, overall
and per question type) and on the blind control (blank images), and model and
processor are saved with ``save_pretrained`` into ``--out`` (plus
``metrics.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import synthetic
from .build import IMAGE_TOKEN_ID, IMAGE_TOKENS, MODEL_DIMS, PAD_ID, build_model, build_processor, format_prompt
from .measure import evaluate, report

IGNORE = -100
TYPES = synthetic.QUESTION_TYPES + ("describe",)


def curriculum_objects(step: int, steps: int, frac: float):
    """Objects per training scene: 1-2, then 1-4 during the first ``frac`` of training, then as at test."""
    f = step / max(1, steps)
    if f < frac / 2:
        return (1, 2)
    if f < frac:
        return (1, 4)
    return None


class ConversationEncoder:
    """Token ids and answer-only labels for multi-turn conversations (cached per text piece)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        out = self._cache.get(text)
        if out is None:
            out = self.tok(text, add_special_tokens=False)["input_ids"]
            self._cache[text] = out
        return out

    def encode(self, turns) -> tuple[list[int], list[int], list[int]]:
        """``(input_ids, labels, kinds)``; ``kinds`` marks the first answer token of
        each turn with the index of its question type in :data:`TYPES` (else -1)."""
        ids = [self.tok.bos_token_id]
        labels = [IGNORE]
        kinds = [-1]
        for k, (prompt, answer, _type) in enumerate(turns):
            pre = format_prompt(prompt) if k == 0 else f"USER: {prompt} ASSISTANT:"
            p = []
            for t in self.ids(pre):
                p += [IMAGE_TOKEN_ID] * IMAGE_TOKENS if t == IMAGE_TOKEN_ID else [t]
            a = self.ids(answer) + [self.tok.eos_token_id]
            ids += p + a
            labels += [IGNORE] * len(p) + a
            kinds += [-1] * len(p) + [TYPES.index(_type)] + [-1] * (len(a) - 1)
        return ids, labels, kinds


def make_batch(
    encoder, image_processor, seed: int, step: int, batch_size: int, questions: int, describe: bool, n_objects=None
):
    images, seqs = [], []
    for j in range(batch_size):
        rng = random.Random(f"shortv-tiny-train/{seed}/{step}/{j}")
        scene, qas = synthetic.training_conversation(
            rng, n_questions=questions, with_description=describe, n_objects=n_objects
        )
        images.append(synthetic.render(scene))
        seqs.append(encoder.encode(qas))
    n = max(len(s[0]) for s in seqs)
    input_ids = torch.full((batch_size, n), PAD_ID, dtype=torch.long)
    labels = torch.full((batch_size, n), IGNORE, dtype=torch.long)
    kinds = torch.full((batch_size, n), -1, dtype=torch.long)
    mask = torch.zeros((batch_size, n), dtype=torch.long)
    for j, (ids, lab, kind) in enumerate(seqs):  # right padding for training
        input_ids[j, : len(ids)] = torch.tensor(ids)
        labels[j, : len(lab)] = torch.tensor(lab)
        kinds[j, : len(kind)] = torch.tensor(kind)
        mask[j, : len(ids)] = 1
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return input_ids, mask, labels, kinds, pixel_values


OBJECTS = [(color, shape) for color in synthetic.COLORS for shape in synthetic.SHAPES]
TARGET_CLASSES = (1 + len(OBJECTS),)  # class 0 = no object


def patch_targets(scene: synthetic.Scene, grid: int) -> torch.Tensor:
    """Labels ``(grid*grid, 1)`` for every patch: which object (colour and shape) is in the patch's cell (0: none).

    Local targets only, like what one patch of a pretrained CLIP knows about
    its own surroundings: nothing about where the patch is, or about the rest
    of the scene.
    """
    cell = grid // synthetic.GRID
    local = torch.zeros((grid, grid, len(TARGET_CLASSES)), dtype=torch.long)
    for o in scene.objects:
        block = local[o.row * cell : (o.row + 1) * cell, o.col * cell : (o.col + 1) * cell]
        block[..., 0] = 1 + OBJECTS.index((o.color, o.shape))
    return local.reshape(grid * grid, len(TARGET_CLASSES))


def random_scenes(tag: str, count: int) -> list[synthetic.Scene]:
    """``count`` training scenes with 1-6 objects, scene ``j`` seeded by ``f"{tag}/{j}"``."""
    scenes = []
    for j in range(count):
        rng = random.Random(f"{tag}/{j}")
        scene, _ = synthetic.training_conversation(rng, n_questions=0, with_description=False, n_objects=(1, 6))
        scenes.append(scene)
    return scenes


def vision_features(model, image_processor, scenes) -> torch.Tensor:
    """``(len(scenes), patches, hidden)``: the vision-tower states LLaVA feeds its projector (CLS dropped)."""
    px = image_processor(images=[synthetic.render(scene) for scene in scenes], return_tensors="pt")["pixel_values"]
    hidden = model.model.vision_tower(px, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def pretrain_vision(model, image_processor, args) -> None:
    """Stage 1: supervised pre-training of the vision tower (stands in for a pretrained CLIP).

    A throw-away linear head on the features LLaVA feeds its projector predicts,
    for every patch, which object is in the patch's cell.
    Only the vision tower is kept; its (zero) position table is not trained.
    """
    cfg = model.config
    vt = model.model.vision_tower
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    head = torch.nn.Linear(cfg.vision_config.hidden_size, sum(TARGET_CLASSES))
    params = [p for p in vt.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0 = time.time()
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, max(1, args.vision_steps // 10), args.vision_lr)
        scenes = random_scenes(f"shortv-tiny-vision/{args.seed}/{step}", args.batch_size)
        feats = vision_features(model, image_processor, scenes)
        logits = head(feats).split(TARGET_CLASSES, dim=-1)
        tgt = torch.stack([patch_targets(scene, grid) for scene in scenes])
        loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt[..., k].reshape(-1)) for k, lg in enumerate(logits))
        loss = loss / len(TARGET_CLASSES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        if (step + 1) % args.log_every == 0 or step == 0:
            with torch.no_grad():
                hits = torch.stack([(lg.argmax(-1) == tgt[..., k]).float().mean() for k, lg in enumerate(logits)])
            log(
                f"vision {step + 1:4d}/{args.vision_steps}  loss {loss.item():.4f}  patch acc "
                f"object {hits[0]:.3f}  "
                f"{(time.time() - t0) / 60:.1f} min"
            )


@torch.no_grad()
def standardize_projector_input(model, image_processor, seed: int, n_images: int = 64) -> float:
    """Fold per-channel standardisation of the vision features into the projector's first layer.

    The raw hidden states of a pre-LN vision transformer carry a large component
    shared by every patch; after the LM's RMSNorm all visual tokens then look
    nearly alike and attention cannot pick out one of them.  Re-parameterising
    ``linear_1`` (a data-dependent initialisation, the architecture is unchanged)
    makes it see zero-mean, unit-variance features.  Returns the ratio of the
    shared component's norm to the per-patch deviation's norm before the fix.
    """
    feats = vision_features(model, image_processor, random_scenes(f"shortv-tiny-standardize/{seed}", n_images))
    feats = feats.reshape(-1, feats.shape[-1]).float()
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    ratio = float(mu.norm() / (feats - mu).norm(dim=-1).mean())
    lin = model.model.multi_modal_projector.linear_1
    lin.weight.div_(sd)
    lin.bias.sub_(lin.weight @ mu)
    return ratio


def grow_depth(model, num_layers: int, seed: int):
    """Deepen the language model to ``num_layers`` by inserting identity layers (progressive stacking).

    The trained layers keep their order and are spread evenly; every new layer
    starts with zero output projections (``o_proj``, ``down_proj``), so the grown
    model computes exactly what the shallow one did and training continues from
    there.  Everything else (vision tower, projector, embeddings, norm, LM head)
    is copied.  Returns a new :class:`~transformers.LlavaForConditionalGeneration`.
    """
    old_layers = model.model.language_model.layers
    n_old = len(old_layers)
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = num_layers
    torch.manual_seed(seed + 1)
    grown = type(model)(config)
    grown.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".layers." not in k or "vision" in k}, strict=False
    )
    slots = [round(i * num_layers / n_old) for i in range(n_old)]
    new_layers = grown.model.language_model.layers
    with torch.no_grad():
        for i, layer in enumerate(new_layers):
            if i in slots:
                layer.load_state_dict(old_layers[slots.index(i)].state_dict())
            else:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    grown.model.vision_tower.requires_grad_(any(p.requires_grad for p in model.model.vision_tower.parameters()))
    grown.generation_config = model.generation_config
    grown.train()
    return grown


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, args) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-8)


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def log(msg: str) -> None:
    print(msg, flush=True)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    processor = build_processor()
    dims = {k: getattr(args, k) for k in MODEL_DIMS if getattr(args, k, None) is not None}
    final_layers = dims.get("text_layers", MODEL_DIMS["text_layers"])
    if args.grow_at:
        dims["text_layers"] = args.grow_from
    model = build_model(seed=args.seed, **dims)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, {json.dumps({**MODEL_DIMS, **dims})}")
    log(f"training: {args.steps} steps x {args.batch_size} images x {args.questions} questions{'' if args.no_describe else ' + description'}, lr {args.lr}")

    t_start = time.time()
    # No absolute positions in the vision tower (zero from build_model, and kept so).
    model.model.vision_tower.embeddings.position_embedding.requires_grad_(False)
    if args.vision_steps:
        pretrain_vision(model, processor.image_processor, args)
    ratio = standardize_projector_input(model, processor.image_processor, args.seed)
    log(f"vision features: shared component / per-patch deviation = {ratio:.2f} (folded into the projector)")
    if not args.train_vision:
        # As in LLaVA: the (pre-trained) vision tower stays fixed while the LM learns
        # to read it; training it at the LM's learning rate erases what stage 1 taught.
        model.model.vision_tower.requires_grad_(False)

    encoder = ConversationEncoder(processor.tokenizer)
    # The hand-built sequence must match what the processor produces at inference time.
    probe = synthetic.make_sample("calib", 0)
    ref = processor(images=synthetic.render(probe["scene"]), text=format_prompt(probe["prompt"]), return_tensors="pt")
    ids, _, _ = encoder.encode([(probe["prompt"], probe["answer"], probe["type"])])
    assert ids[: ref["input_ids"].shape[1]] == ref["input_ids"][0].tolist(), "training/inference tokenisation differ"

    opt = make_optimizer(model, args)
    calib = list(synthetic.generate("calib", args.n_calib))

    t0 = time.time()
    ema_loss = ema_acc = None
    history = []
    window = [[0, 0] for _ in TYPES]
    for step in range(args.steps):
        if args.grow_at and step == args.grow_at:
            model = grow_depth(model, final_layers, seed=args.seed)
            opt = make_optimizer(model, args)
            log(f"grew the language model to {final_layers} layers at step {step}")
        lr = lr_at(step, args.steps, args.warmup, args.lr)
        if args.grow_at and step >= args.grow_at:  # a short re-warm-up for the fresh optimizer state
            lr *= min(1.0, (step - args.grow_at + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        n_objects = curriculum_objects(step, args.steps, args.curriculum)
        input_ids, mask, labels, kinds, pixel_values = make_batch(
            encoder, processor.image_processor, args.seed, step, args.batch_size, args.questions,
            not args.no_describe, n_objects,
        )
        logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values).logits
        tgt = labels[:, 1:]
        sel = tgt != IGNORE
        lg = logits[:, :-1][sel]
        loss = F.cross_entropy(lg.float(), tgt[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], args.clip))
        opt.step()

        # accuracy on the first answer token of every question, per type
        with torch.no_grad():
            hit = lg.argmax(-1) == tgt[sel]
            kind = kinds[:, 1:][sel]
            for k in range(len(TYPES)):
                m = kind == k
                window[k][0] += int(hit[m].sum())
                window[k][1] += int(m.sum())
            acc = hit[(kind >= 0) & (kind < len(TYPES) - 1)].float().mean().item()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t0
            eta = el / (step + 1) * (args.steps - step - 1)
            log(
                f"step {step + 1:5d}/{args.steps}  loss {ema_loss:.4f}  answer-acc {ema_acc:.3f}  "
                f"lr {lr:.2e}  gnorm {gnorm:.2f}  {el / 60:5.1f} min  (eta {eta / 60:.1f} min)"
            )
            log("    train acc  " + "  ".join(f"{t} {100 * h / max(c, 1):.0f}" for t, (h, c) in zip(TYPES, window)))
            window = [[0, 0] for _ in TYPES]
        if args.eval_every and ((step + 1) % args.eval_every == 0) and step + 1 < args.steps:
            res = evaluate(model, processor, calib)
            per = "  ".join(f"{t} {100 * res[t]:.0f}" for t in synthetic.QUESTION_TYPES)
            log(f"  calib greedy accuracy {100 * res['overall']:.1f}%  ({per})")
            history.append({"step": step + 1, "calib": res["overall"], "loss": ema_loss})
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            model.save_pretrained(out / f"step-{step + 1}")
            processor.save_pretrained(out / f"step-{step + 1}")
    train_min = (time.time() - t_start) / 60
    log(f"training done in {train_min:.1f} min")

    model.eval()
    test = list(synthetic.generate("test", args.n_test))
    res_test = evaluate(model, processor, test)
    res_blind = evaluate(model, processor, test, blank=True)
    majority = synthetic.majority_baseline(test)
    log(report(res_test, res_blind, majority))

    model.save_pretrained(out)
    processor.save_pretrained(out)
    metrics = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "params": n_params,
        "train_minutes": round(train_min, 2),
        "threads": args.threads,
        "test": {k: v for k, v in res_test.items() if k != "predictions"},
        "blind": {k: v for k, v in res_blind.items() if k != "predictions"},
        "majority": majority,
        "history": history,
        "argv": sys.argv[1:],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"saved to {out}")
    return metrics


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m shortv.tiny.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (save_pretrained)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--questions", type=int, default=10, help="questions per training image (multi-turn)")
    ap.add_argument("--curriculum", type=float, default=0.0, help="fraction of steps on easier scenes (1-4 objects)")
    ap.add_argument("--no-describe", action="store_true", help="no final 'Describe the image.' turn")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vision-steps", type=int, default=500, help="stage 1: vision tower pre-training steps")
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument("--grow-from", type=int, default=8, help="layers of the shallow LM trained before --grow-at")
    ap.add_argument("--grow-at", type=int, default=2400,
                    help="step at which the LM is deepened to --text-layers by inserting identity layers (0: never)")
    ap.add_argument("--train-vision", action=argparse.BooleanOptionalAction, default=False,
                    help="keep training the vision tower in stage 2 (default: frozen, as in LLaVA)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=400, help="greedy accuracy on the calib split (0: never)")
    ap.add_argument("--save-every", type=int, default=0, help="also save a checkpoint every this many steps")
    ap.add_argument("--n-calib", type=int, default=150)
    ap.add_argument("--n-test", type=int, default=1000)
    for k, v in MODEL_DIMS.items():
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=type(v), default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
