"""Integrations with third-party tools. Each one is imported only on demand; ``import shortv`` needs none of them.

* :mod:`shortv.integrations.lmms_eval`: the ``shortv`` model of `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_
  (``lmms-eval --model shortv --model_args pretrained=...,shortv_config=shortv_config.json``).
* :mod:`shortv.integrations.lmms_eval_task`: a shortv JSONL file as a local lmms-eval task (``write_task``).
"""

from __future__ import annotations

#: Name of the model on lmms-eval's command line (``--model shortv``).
LMMS_EVAL_MODEL_ID = "shortv"


def lmms_eval_manifests() -> list:
    """Entry point of the ``lmms_eval.models`` group (see pyproject.toml): how lmms-eval >= 0.7 finds ``shortv``.

    Deliberately light: lmms-eval calls this while building its model registry, for every run (whatever model is
    asked for), so it only names the classes; they are imported when ``--model shortv`` is actually used.
    ``--model shortv`` resolves to the chat class (lmms-eval's default for models that have one);
    ``--force_simple`` picks the simple (``doc_to_text`` + ``doc_to_visual``) class.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=LMMS_EVAL_MODEL_ID,
            simple_class_path="shortv.integrations.lmms_eval.ShortV",
            chat_class_path="shortv.integrations.lmms_eval.ShortVChat",
        )
    ]
