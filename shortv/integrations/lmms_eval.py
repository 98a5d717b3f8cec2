"""The ``shortv`` model of lmms-eval: any Hugging Face MLLM that shortv supports, with ShortV applied.

Enable it by installing shortv next to lmms-eval (>= 0.7): shortv declares the entry point
``[project.entry-points."lmms_eval.models"] shortv = "shortv.integrations:lmms_eval_manifests"``, which lmms-eval reads
when it builds its model registry. Then::

    lmms-eval --model shortv --tasks mme --batch_size 8 \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,shortv_config=shortv_config.json,dtype=float16

Model arguments (``--model_args key=value,...``):

``pretrained``
    Local folder or hub id, loaded with `shortv.loading.load_model` (left out: the embedded tiny LLaVA).
``shortv_config``
    A config JSON of any method: ShortV (``shortv calibrate`` writes one, layer- or operator-level), or FastV / VTW
    (`shortv.pruning.TokenPruningConfig`); its fields say which.
``method``, ``k``, ``ratio``, ``rank``
    Another method than ShortV (`shortv.methods`): ``method=fastv,k=2,ratio=0.5`` (``rank=last`` or ``mean``),
    ``method=vtw,k=16``, ``method=shortv+fastv,n=19,lc=lc.json,k=2,ratio=0.5`` (the ShortV part from ``n``/``lc``/
    ``preset``/``shortv_config``). The log line of the loaded model, and the model's ``method_record``, name the
    method and every parameter. Under FastV/VTW, ``loglikelihood`` scores the continuation, which is text after
    every visual token, so it is never pruned (checked on every batch).
``n`` and ``lc``
    Freeze the ``n`` layers with the lowest visual Layer Contribution in ``lc`` (an LC JSON from ``shortv
    calibrate``). ``n`` without ``lc`` takes the first ``n`` layers of the published order for ``preset`` (default:
    ``pretrained``, e.g. ``llava-hf/llava-1.5-7b-hf``); ``preset`` alone takes the whole published order.
``shortv_mode``
    ``fast`` (skip the frozen tokens' compute) or ``reference`` (run the layer, restore the frozen tokens); overrides
    the config's mode.
``trust_remote_code``
    ``true`` lets the model folder or hub repo run its own Python code (off by default; only for trusted sources).
``allow_other_model``
    ``true`` accepts an ``lc``/``shortv_config`` file recorded for other weights (the layer count must match).
``dtype`` (``float16``, ``bfloat16``, ``float32``; default: the checkpoint's), ``device`` (default: ``cuda`` when
available), ``device_map`` (e.g. ``auto`` to shard one model over the visible GPUs), ``attn_implementation``
(default ``sdpa``), ``max_new_tokens`` (default when a task does not set it: 1024), ``chat_template`` (a Jinja
template or a file holding one, for processors without a chat template), ``system_prompt`` (text or a file),
``num_frames`` (frames read, uniformly spaced, from each video file a task gives; default 8).

No config at all runs the unmodified model (the baseline); ``n=0`` (or a config with no layers) applies ShortV with
nothing frozen, which computes exactly the baseline. The whole model interface of lmms-eval is implemented:

* ``generate_until``: batches (``--batch_size``) are left-padded; decoding is greedy unless a task's
  ``temperature`` is > 0. ``until`` stop strings cut the answer at their first occurrence (and stop generating that
  answer early).
* ``loglikelihood`` (``output_type: multiple_choice`` and ``loglikelihood`` tasks; lmms-eval builds them for the
  simple model only, so run them with ``--force_simple``): ShortV applies to the context's prefill, the continuation
  is text. Returns lmms-eval's convention, the mean loss of the continuation's tokens (lower is likelier), with
  ``is_greedy``. Right-padded batches, the same results at any batch size.
* ``generate_until_multi_round``: each round's prompt from the task, answers of all rounds per request.
* Videos (families that take them: Qwen2/2.5/3-VL, LLaVA-OneVision, ...): video files the task names (read into
  ``num_frames`` frames by transformers' ``load_video``), or frames; their tokens are visual, like image tokens.
  A family without video support says so in one line.

Full reference, with a local-task recipe: docs/lmms_eval.md.

Data-parallel runs (``accelerate launch --multi_gpu -m lmms_eval ...``, or ``torchrun --nproc_per_node N -m
lmms_eval ...``, also on CPU) work as with lmms-eval's own models: the model's ``accelerator`` joins the process group
(gloo when the device is the CPU), each process puts a whole copy of the model on its own device (``cuda:LOCAL_RANK``,
or the CPU) and lmms-eval gives each its share of the requests by ``rank`` and ``world_size``, then gathers the
answers. ``device_map`` is for a single process.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

try:
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    from lmms_eval.api.model import lmms
    from loguru import logger
except ImportError as _error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"shortv.integrations.lmms_eval needs lmms-eval (>= 0.7) and its model interface: {_error}. Install it with "
        "`pip install 'shortv[eval]'`, or, into an environment whose torch must stay as it is, "
        "`pip install --no-deps lmms-eval==0.7.3 loguru pytz`."
    ) from _error

from ..config import ShortVConfig
from ..data import DEFAULT_VIDEO_FRAMES, check_takes_video, encode
from ..loading import inputs_for, load_model, resolve_model
from ..methods import describe_record, method_of
from ..pruning import get_pruning_state, kept_columns
from ..selection import check_matches_model
from .lmms_eval_config import is_none, resolve_method_config, resolve_shortv_config
from .lmms_eval_inputs import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationSettings,
    Visuals,
    _as_visuals,
    _stop_strings_criterion,
    truncate_at_stops,
)

__all__ = ["ShortV", "ShortVChat", "GenerationSettings", "Visuals", "resolve_method_config", "resolve_shortv_config"]

#: lmms-eval 0.7.3's evaluator passes every model output through ``unwrap_generation_output``, which turns a
#: loglikelihood tuple ``(loss, is_greedy)`` into its ``str``: multiple-choice scoring then fails for every model.
#: Where it does, the tuples go out wrapped as ``GenerationResult(text=(loss, is_greedy))``, which it unwraps intact.
_WRAP_SCORES = unwrap_generation_output((0.0, True))[0] != (0.0, True)
#: Image placeholders lmms-eval prompts may carry (besides the processor's own image token).
_PROMPT_IMAGE_TOKENS = ("<image>",)


# --------------------------------------------------------------------------- models


class ModelLoadError(SystemExit):
    """The lmms-eval model could not be built from its ``--model_args``. A `SystemExit` whose code is the message
    (Python prints it on stderr and exits with status 1), since lmms-eval swallows every ``Exception``; catch it by
    this name when calling lmms-eval from Python."""


def _check_scored_columns(columns: torch.Tensor | None, width: int, keep: int) -> None:
    """FastV/VTW return the kept positions only: the ``keep`` scored ones must be the prompt's last, unpruned (they
    are text after every visual token)."""
    if columns is None:
        return
    expected = torch.arange(width - keep, width, device=columns.device)
    if columns.shape[1] < keep or not bool((columns[:, -keep:] == expected).all()):
        raise ValueError("FastV/VTW pruned a position whose log-likelihood is scored (a visual token after the "
                         "context's start of the continuation); score this task without token pruning")


class _ShortVModel(lmms):
    """Loading, batching and generation shared by the simple and chat variants (they differ in the prompt)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> _ShortVModel:
        """How lmms-eval's command line builds the model. lmms-eval 0.7.3 catches every ``Exception`` of a run,
        prints it and exits 0, so a model that cannot be built (a wrong path, a config for another model) would
        look like success to a script or a CI job: it ends the run here instead, with exit status 1."""
        try:
            return super().create_from_arg_string(arg_string, additional_config)
        except Exception as error:  # noqa: BLE001 - every failure to build the model must reach the exit status
            raise ModelLoadError(f"shortv: the lmms-eval model was not built: {error}") from error

    def __init__(
        self,
        pretrained: str | None = None,
        shortv_config: str | None = None,
        n: int | None = None,
        lc: str | None = None,
        preset: str | None = None,
        shortv_mode: str | None = None,
        method: str | None = None,
        k: int | None = None,
        ratio: float | None = None,
        rank: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        device_map: str | None = None,
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        max_batch_size: int | None = None,  # passed by lmms-eval; only used with batch_size=auto, which we refuse
        torch_dtype: str | None = None,
        trust_remote_code: bool = False,
        allow_other_model: bool = False,
        num_frames: int = DEFAULT_VIDEO_FRAMES,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"unknown model argument(s) for the shortv lmms-eval model: {', '.join(sorted(unknown))}. Known: "
                "pretrained, shortv_config, n, lc, preset, shortv_mode, method, k, ratio, rank, dtype, device, "
                "device_map, "
                "attn_implementation, batch_size, max_new_tokens, chat_template, system_prompt, trust_remote_code, "
                "allow_other_model, num_frames"
            )
        if not isinstance(trust_remote_code, bool) or not isinstance(allow_other_model, bool):
            raise ValueError("trust_remote_code and allow_other_model take true or false")
        pretrained = None if is_none(pretrained) else str(pretrained)
        self.shortv_config = resolve_shortv_config(pretrained, shortv_config, n, lc, preset, shortv_mode)
        #: The config applied (any method's) and its record: method name and every parameter (None: the baseline).
        self.method_config = resolve_method_config(self.shortv_config, method, k, ratio, rank)
        if not isinstance(self.shortv_config, ShortVConfig):
            self.shortv_config = None
        self.method_record = None if self.method_config is None else method_of(self.method_config).record(
            self.method_config)
        try:
            self._batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a positive integer (no 'auto'), got {batch_size!r}") from None
        if self._batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.num_frames = int(num_frames)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 (frames read from each video file), got {num_frames!r}")
        if torch_dtype is not None and dtype is None:
            dtype = torch_dtype

        device = self._pick_device(device)
        # As lmms-eval's own models: an Accelerator, whose process group lmms-eval uses too (gloo for CPU processes).
        # Each process holds a whole copy of the model and answers its share of the requests (rank of world_size).
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if self._world_size > 1 and not is_none(device_map):
            raise ValueError(
                f"device_map={device_map} spreads one model over all the devices a process sees, but this launch has "
                f"{self._world_size} processes, each with its own copy; drop device_map, or run one process"
            )
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.accelerator.local_process_index if self._world_size > 1
                                  else torch.cuda.current_device())
        source = resolve_model(pretrained, trust_remote_code)
        if self.shortv_config is not None:  # a file made for another model would freeze the wrong layers
            where = next((str(v) for v in (shortv_config, lc) if not is_none(v)), "the ShortV preset")
            check_matches_model(self.shortv_config, source.num_layers, source.model_id, where, allow_other_model,
                                source.fingerprint)
        if self.method_config is not None:
            method_of(self.method_config).check(self.method_config, source.num_layers)
        model, processor, self.model_id = load_model(
            source, dtype=None if is_none(dtype) else dtype, device_map=None if is_none(device_map) else device_map,
            attn_implementation=attn_implementation,
        )
        if is_none(device_map):
            model.to(device)
        self._device = model.get_input_embeddings().weight.device
        if self.method_config is not None:
            method_of(self.method_config).apply(model, self.method_config)
            logger.info(f"shortv: {self.model_id} with {describe_record(self.method_record)}")
        else:
            logger.warning(f"shortv: no ShortV config or method given; evaluating the unmodified {self.model_id} "
                           "(baseline)")
        self._model, self._processor = model, processor

        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"  # batched generation: every answer starts at the same column
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not is_none(chat_template):
            template = Path(chat_template)
            processor.chat_template = template.read_text() if template.is_file() else chat_template
        self.chat_template_available = bool(
            getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        )
        self.system_prompt = self._resolve_system_prompt(system_prompt) if not is_none(system_prompt) else None
        self.image_token = getattr(processor, "image_token", None) or _PROMPT_IMAGE_TOKENS[0]
        self._warned: set[str] = set()

    @staticmethod
    def _pick_device(device: str | None) -> torch.device:
        """``device``, or the GPU when there is one (which GPU: see ``__init__``), else the CPU."""
        if is_none(device):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(device)

    # lmms-eval reads these ------------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._model

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return getattr(self._processor, "tokenizer", self._processor)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def shortv_layers(self) -> list[int]:
        """The layers ShortV freezes in the loaded model, alone or with FastV/VTW ([] for the baseline)."""
        return [] if self.method_record is None else list(self.method_record.get("layers", []))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    # prompts ---------------------------------------------------------------------------------------------------
    def _request_parts(self, request: Any) -> tuple[str, dict[str, Any] | None, Any]:
        """(context, gen_kwargs, prompt source) of one generation request."""
        raise NotImplementedError

    def _messages(self, request: Any) -> tuple[list[dict[str, Any]], Visuals]:
        """Chat messages in transformers' format (``{"type": "image"}`` / ``{"type": "video"}`` parts) and the
        visuals, in order: the prompt of a generation request (the first round of a multi-round one)."""
        raise NotImplementedError

    def _next_round(self, request: Any, round_idx: int, outputs: list[str], info: Any
                    ) -> tuple[list[dict[str, Any]], Visuals, Any] | None:
        """(messages, visuals, round info) of round ``round_idx`` (>= 1) of a multi-round request, from the task's
        answers so far; None when the task says the request is done."""
        raise NotImplementedError

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as error:
            raise KeyError(f"lmms-eval gave no document {task}/{split}/{doc_id} (lm.task_dict): {error}") from None

    def _content(self, context: str, visuals: Visuals) -> list[dict[str, Any]]:
        """One user turn's parts for a context string and its visuals: the images at the context's ``<image>``
        placeholders when it has exactly one per image, otherwise before the text; videos before the text."""
        n_images = len(visuals.images)
        videos = [{"type": "video"} for _ in visuals.videos]
        placeholders = sorted({self.image_token, *_PROMPT_IMAGE_TOKENS}, key=len, reverse=True)
        pieces = re.split("|".join(re.escape(token) for token in placeholders), context)
        if n_images and len(pieces) - 1 == n_images:
            content: list[dict[str, Any]] = list(videos)
            for index, piece in enumerate(pieces):
                if index:
                    content.append({"type": "image"})
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
            return content
        if len(pieces) > 1 and n_images:
            self._warn_once(
                f"shortv: a prompt has {len(pieces) - 1} image placeholder(s) for {n_images} image(s); "
                "the placeholders are dropped and the images put before the text"
            )
        text = "".join(pieces).strip() if len(pieces) > 1 else context
        return [{"type": "image"} for _ in range(n_images)] + videos + [{"type": "text", "text": text}]

    def _render(self, messages: list[dict[str, Any]]) -> str:
        if self.system_prompt:
            messages = self._apply_system_prompt(messages, self.system_prompt)
        if self.chat_template_available:
            return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self._warn_once("shortv: the processor has no chat template (pass chat_template=); using the raw prompt")
        parts = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                parts.append(content)
                continue
            for part in content:
                if part["type"] == "text":
                    parts.append(part["text"])
                elif part["type"] == "image":
                    parts.append(f"{self.image_token}\n")
                else:
                    parts.append(f"{getattr(self._processor, 'video_token', None) or '<video>'}\n")
        return "".join(parts)

    def _encode(self, prompts: list[str], visuals: list[Visuals], padding_side: str) -> dict[str, Any]:
        """Model inputs for rendered prompts and their visuals, padded on ``padding_side``, on the model's device."""
        videos = [video for item in visuals for video in item.videos]
        if videos:
            check_takes_video(self._processor, "this task gives a video")
        batch = encode(self._processor, prompts, [item.images for item in visuals], videos, padding=True,
                       padding_side=padding_side)
        return inputs_for(self._model, dict(batch))

    def _settings_groups(self, requests: list[Any]) -> dict[GenerationSettings, list[int]]:
        """Request indices by generation settings (only equal settings share a batch), longest prompts first."""
        groups: dict[GenerationSettings, list[int]] = {}
        for index, request in enumerate(requests):
            settings, ignored = GenerationSettings.from_kwargs(self._request_parts(request)[1], self.max_new_tokens)
            if ignored:
                self._warn_once(f"shortv: ignoring generation kwargs {ignored}")
            groups.setdefault(settings, []).append(index)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(self._request_parts(requests[i])[0]))
        return groups

    # lmms-eval's interface ---------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any]) -> list[str]:
        """One answer per request, in request order. Requests with equal generation settings are batched together,
        longest prompts first (less padding)."""
        from tqdm.auto import tqdm

        results: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0) as bar:
            for settings, indices in self._settings_groups(requests).items():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    answers = self._generate([self._messages(requests[i]) for i in chunk], settings)
                    for i, answer in zip(chunk, answers):
                        results[i] = answer
                        context, gen_kwargs, _ = self._request_parts(requests[i])
                        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
                    bar.update(len(chunk))
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Any]) -> list[list[str]]:
        """Per request, the answer of every round, in request order. Round 0 is the request's prompt; each later
        round's prompt (and visuals) comes from the task (``doc_to_text`` of a simple task, ``doc_to_messages`` of a
        chat task, called with ``round_idx``, ``previous_output`` and ``previous_round_info``) until it says the
        request is done. Each round is a fresh prompt, as in lmms-eval's own models: the task puts whatever history
        it wants into it. The requests of a batch run their rounds together; a finished one leaves the batch."""
        from tqdm.auto import tqdm

        results: list[list[str] | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0) as bar:
            for settings, indices in self._settings_groups(requests).items():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    prompts = {i: self._messages(requests[i]) for i in chunk}
                    outputs: dict[int, list[str]] = {i: [] for i in chunk}
                    info: dict[int, Any] = dict.fromkeys(chunk)
                    active, round_idx = list(chunk), 0
                    while active:
                        for i, answer in zip(active, self._generate([prompts[i] for i in active], settings)):
                            outputs[i].append(answer)
                        round_idx += 1
                        still = []
                        for i in active:
                            following = self._next_round(requests[i], round_idx, list(outputs[i]), info[i])
                            if following is not None:
                                *prompts[i], info[i] = following
                                still.append(i)
                        active = still
                    for i in chunk:
                        results[i] = outputs[i]
                        context, gen_kwargs, _ = self._request_parts(requests[i])
                        self.cache_hook.add_partial("generate_until_multi_round", (context, gen_kwargs), outputs[i])
                    bar.update(len(chunk))
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(self, prompts: list[tuple[list[dict[str, Any]], Visuals]], settings: GenerationSettings) -> list[str]:
        inputs = self._encode([self._render(messages) for messages, _ in prompts],
                              [visuals for _, visuals in prompts], padding_side="left")
        prompt_length = inputs["input_ids"].shape[1]
        kwargs = settings.generate_kwargs()
        if settings.until and settings.num_beams == 1:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_stop_strings_criterion(self.tokenizer, settings.until, prompt_length)]
            )
        output = self._model.generate(**inputs, **kwargs, pad_token_id=self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        return [truncate_at_stops(text, settings.until).strip() for text in texts]

    def _scoring_parts(self, request: Any) -> tuple[str, str, Any]:
        """(context, continuation, visual source) of a loglikelihood request: ``(context, continuation or
        doc_to_target, doc_to_visual, doc_id, task, split)``, or ``(context, continuation)`` (no visuals; lmms-eval's
        unconditional requests for ``acc_mutual_info``)."""
        args = request.args
        if len(args) == 2:
            return str(args[0]), str(args[1]), None
        context, target, doc_to_visual, doc_id, task, split = args
        continuation = target(self._doc(task, split, doc_id)) if callable(target) else target
        if isinstance(continuation, (list, tuple)):
            raise ValueError(f"a loglikelihood request needs one continuation string, got {continuation!r}")
        # The document (and its images) is read when its batch is scored, not all at once here.
        return str(context), str(continuation), (doc_to_visual, task, split, doc_id) if doc_to_visual else None

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """Per request, ``(mean negative log-likelihood of the continuation's tokens, is_greedy)``, in request order.

        The context is the prompt ``generate_until`` gives the model (its visuals, the chat template, the generation
        prompt); the continuation follows it as the answer's text. One forward over both: ShortV freezes the
        visual tokens of the context's prefill, and the continuation's tokens, being text, are computed in full, so
        their probabilities are those the patched model gives while decoding them. lmms-eval's multiple-choice
        scoring takes the choice with the *lowest* value (``argmin``), as for its own Hugging Face models, which
        return the mean loss: so the first element is the loss, lower meaning more likely (times the token count
        and negated, it is the continuation's log-probability). ``is_greedy``: every continuation token is the
        model's argmax. Batched (``batch_size``, longest first, right-padded: each row keeps the positions it has
        alone), with the same results at every batch size up to float rounding. Under lmms-eval 0.7.3 each pair
        comes wrapped as ``GenerationResult(text=pair)`` (see ``_WRAP_SCORES``); ``unwrap_generation_output`` gives
        it back."""
        from tqdm.auto import tqdm

        parts = [self._scoring_parts(request) for request in requests]
        order = sorted(range(len(parts)), key=lambda i: -(len(parts[i][0]) + len(parts[i][1])))
        results: list[tuple[float, bool] | None] = [None] * len(parts)
        with tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for i, result in zip(chunk, self._score([parts[i] for i in chunk])):
                    results[i] = result
                    self.cache_hook.add_partial("loglikelihood", parts[i][:2], result)
                bar.update(len(chunk))
        if _WRAP_SCORES:
            return [GenerationResult(text=result) for result in results]  # type: ignore[misc]
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score(self, parts: list[tuple[str, str, Any]]) -> list[tuple[float, bool]]:
        fulls, visuals, counts = [], [], []
        loaded: dict[Any, Visuals] = {None: Visuals([], [])}  # a document's choices share its visuals: read once
        for context, continuation, source in parts:
            if source not in loaded:
                doc_to_visual, task, split, doc_id = source
                loaded[source] = _as_visuals(doc_to_visual(self._doc(task, split, doc_id)), self.num_frames)
            found = loaded[source]
            prompt = self._render([{"role": "user", "content": self._content(context, found)}])
            count = len(self.tokenizer(prompt + continuation)["input_ids"]) - len(self.tokenizer(prompt)["input_ids"])
            if count < 1:
                raise ValueError(f"the continuation {continuation!r} adds no token to its prompt; nothing to score")
            fulls.append(prompt + continuation)
            visuals.append(found)
            counts.append(count)
        inputs = self._encode(fulls, visuals, padding_side="right")
        ids, lengths = inputs["input_ids"], inputs["attention_mask"].sum(dim=1).tolist()
        # Logits only from the first position that predicts a continuation token on: less memory than all of them.
        first = min(length - count - 1 for length, count in zip(lengths, counts))
        keep = ids.shape[1] - first
        pruning = get_pruning_state(self._model)
        if pruning is not None:
            pruning.last_columns = None  # set again by a forward that prunes
        logits = self._model(**inputs, use_cache=False, logits_to_keep=keep).logits
        if pruning is not None:
            _check_scored_columns(kept_columns(self._model), ids.shape[1], keep)
        results = []
        for row, (length, count) in enumerate(zip(lengths, counts)):
            positions = torch.arange(length - count - 1, length - 1, device=logits.device)
            log_probs = logits[row, positions - first].float().log_softmax(dim=-1)
            targets = ids[row, positions + 1].to(logits.device)
            token_log_probs = log_probs.gather(-1, targets[:, None]).squeeze(-1)
            greedy = bool((log_probs.argmax(dim=-1) == targets).all())
            results.append((float(-token_log_probs.mean()), greedy))
        return results


class ShortV(_ShortVModel):
    """lmms-eval "simple" model: requests carry ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``
    (multi-round: ``doc_to_text`` after ``doc_to_visual``; loglikelihood: ``(context, continuation, doc_to_visual,
    doc_id, task, split)``).

    The prompt is the context in one user turn of the processor's chat template, with one image part per image:
    at the context's ``<image>`` placeholders when it has exactly one per image, otherwise before the text; videos
    (video files, read into ``num_frames`` frames) before the text.
    """

    is_simple = True

    def _request_parts(self, request: Any) -> tuple[str, dict[str, Any] | None, Any]:
        args = request.args
        if len(args) == 7:  # generate_until_multi_round: doc_to_text makes the later rounds
            context, gen_kwargs, doc_to_visual, _, doc_id, task, split = args
        else:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        return context, gen_kwargs, (doc_to_visual, doc_id, task, split)

    def _messages(self, request: Any) -> tuple[list[dict[str, Any]], Visuals]:
        context, _, (doc_to_visual, doc_id, task, split) = self._request_parts(request)
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        found = _as_visuals(visuals, self.num_frames)
        return [{"role": "user", "content": self._content(context, found)}], found

    def _next_round(self, request: Any, round_idx: int, outputs: list[str], info: Any
                    ) -> tuple[list[dict[str, Any]], Visuals, Any] | None:
        if len(request.args) != 7:
            raise ValueError("a multi-round request carries (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, "
                             f"task, split); got {len(request.args)} arguments")
        _, _, _, doc_to_text, doc_id, task, split = request.args
        payload = doc_to_text(self._doc(task, split, doc_id), previous_output=outputs, round_idx=round_idx,
                              previous_round_info=info)
        if not (isinstance(payload, tuple) and len(payload) == 5):
            raise ValueError("a multi-round task's doc_to_text must return (visuals, context, terminal, "
                             f"previous_output, round_info) for round {round_idx}, got {type(payload).__name__}")
        visuals, context, terminal, _, info = payload
        if terminal:
            return None
        found = _as_visuals(visuals, self.num_frames)
        return [{"role": "user", "content": self._content(context, found)}], found, info


class ShortVChat(_ShortVModel):
    """lmms-eval "chat" model: requests carry ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``; the
    messages (text, image and video parts, any roles) go through the processor's chat template as they are.
    lmms-eval's chat tasks only generate: likelihood tasks (``multiple_choice``, ``loglikelihood``) need
    ``--force_simple``, which picks `ShortV`."""

    is_simple = False

    def _request_parts(self, request: Any) -> tuple[str, dict[str, Any] | None, Any]:
        context, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        return context, gen_kwargs, (doc_to_messages, doc_id, task, split)

    def _messages(self, request: Any) -> tuple[list[dict[str, Any]], Visuals]:
        _, _, (doc_to_messages, doc_id, task, split) = self._request_parts(request)
        raw = doc_to_messages(self._doc(task, split, doc_id)) if callable(doc_to_messages) else doc_to_messages
        return self._convert(raw)

    def _next_round(self, request: Any, round_idx: int, outputs: list[str], info: Any
                    ) -> tuple[list[dict[str, Any]], Visuals, Any] | None:
        _, (doc_to_messages, doc_id, task, split) = self._request_parts(request)[1:]
        if not callable(doc_to_messages):
            return None
        payload = doc_to_messages(self._doc(task, split, doc_id), round_idx=round_idx, previous_output=outputs,
                                  previous_round_info=info)
        if not (isinstance(payload, tuple) and len(payload) == 4):  # lmms-eval's protocol: anything else ends it
            return None
        raw, terminal, _, info = payload
        if terminal or raw is None:
            return None
        return (*self._convert(raw), info)

    def _convert(self, raw: Any) -> tuple[list[dict[str, Any]], Visuals]:
        if hasattr(raw, "model_dump"):  # lmms_eval.protocol.ChatMessages
            raw = raw.model_dump()["messages"]
        messages, found = [], Visuals([], [])
        for message in raw:
            if hasattr(message, "model_dump"):
                message = message.model_dump()
            content = message["content"]
            if isinstance(content, str):
                messages.append({"role": message["role"], "content": content})
                continue
            parts = []
            for part in content:
                if hasattr(part, "model_dump"):
                    part = part.model_dump()
                if part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                elif part["type"] in ("image", "video"):
                    visuals = _as_visuals(part.get("url", part.get(part["type"])), self.num_frames, part["type"])
                    found += visuals
                    parts += [{"type": "image"} for _ in visuals.images] + [{"type": "video"} for _ in visuals.videos]
                else:
                    raise NotImplementedError(
                        f"the shortv lmms-eval model takes text, images and videos; this task gives {part['type']}"
                    )
            messages.append({"role": message["role"], "content": parts})
        return messages, found
