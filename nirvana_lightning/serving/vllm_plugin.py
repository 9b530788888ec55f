"""vLLM general plugin (entry point group ``vllm.general_plugins``): registers the pruned architectures.

vLLM calls :func:`register` in every process it starts (engine core and workers), which is why it
must be an installed entry point rather than a call in the user's script. The classes are
registered by ``"module:Class"`` name, so nothing heavy is imported until vLLM builds a model.
"""

from __future__ import annotations

from . import SERVING_ARCHITECTURES, VLLM_FAMILIES

MODELS_MODULE = "nirvana_lightning.serving.vllm_models"


def register() -> None:
    from vllm import ModelRegistry

    for arch in (SERVING_ARCHITECTURES[t] for t in VLLM_FAMILIES):
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
