"""Serving what nirvana-lightning prunes: a vLLM plugin, a GGUF writer for llama.cpp / Ollama, and engine runners.

Importing this package (or :mod:`.vllm_plugin`) imports neither Lightning nor vLLM; each submodule
imports only what it needs, so the vLLM plugin loads in a serving environment that holds vLLM,
transformers and this package without its training dependencies.
"""

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..families import FAMILIES

#: model_type -> the architecture name written into an export's config.json and registered with vLLM, for every
#: family an engine may serve (``ModelFamily.servable``). The same names are the classes of
#: ``families/remote_modeling.py`` (transformers, remote code).
SERVING_ARCHITECTURES: dict[str, str] = {model_type: f"Nirvana{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}"
                                         for model_type, family in FAMILIES.items() if family.servable}

#: the families whose per-layer-width classes exist for vLLM (:mod:`.vllm_models`), as each declares
#: (``ModelFamily.vllm_served``); the others' exports reload in transformers (``load_pruned`` / remote code)
VLLM_FAMILIES: tuple[str, ...] = tuple(t for t, family in FAMILIES.items() if family.vllm_served)
