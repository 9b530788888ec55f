"""Serving what nirvana-lightning prunes: a vLLM plugin, a GGUF writer for llama.cpp / Ollama, and engine runners.

Importing this package (or :mod:`.vllm_plugin`) imports neither Lightning nor vLLM; each submodule
imports only what it needs, so the vLLM plugin loads in a serving environment that holds vLLM,
transformers and this package without its training dependencies.
"""

#: model_type -> the architecture name written into an export's config.json and registered with vLLM.
#: The same names are the classes of ``families/remote_modeling.py`` (transformers, remote code).
SERVING_ARCHITECTURES: dict[str, str] = {
    "llama": "NirvanaLlamaForCausalLM",
    "mistral": "NirvanaMistralForCausalLM",
    "qwen2": "NirvanaQwen2ForCausalLM",
    "qwen3": "NirvanaQwen3ForCausalLM",
    "gemma3_text": "NirvanaGemma3ForCausalLM",
}

#: the families whose per-layer-width classes exist for vLLM (:mod:`.vllm_models`); Gemma 3 exports reload in
#: transformers (``load_pruned`` / remote code) but vLLM classes for them are not written yet
VLLM_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
