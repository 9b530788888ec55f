"""What a pruned model's per-layer widths allow at serving time, stated in the export.

Engines and formats constrain widths: GGUF's q8_0/q4_0 quantise rows in blocks of 32 values (k-quants in
256), tensor parallelism splits heads and MLP neurons evenly over ranks, and llama.cpp runs per-layer
widths only through its ``deci`` graph (no q/k norms). ``serving_constraints`` lists every constraint a
model breaks; ``save_pruned`` writes the list into the model card and ``serving.json``.
"""

from __future__ import annotations

from typing import Any

TP_DEGREES = (2, 4, 8)
BLOCKS = {"q8_0/q4_0": 32, "k-quants (q4_k, q6_k, ...; llama-quantize)": 256}


def serving_constraints(model_type: str, heads: list[int], kv_heads: list[int], ffn: list[int]) -> dict[str, Any]:
    """``{"uniform", "gguf_architecture", "max_tp_size", "broken": [messages]}`` for these per-layer widths."""
    from .gguf_export import ARCHITECTURES

    uniform = len(set(heads)) == 1 and len(set(kv_heads)) == 1 and len(set(ffn)) == 1
    broken: list[str] = []
    same, per_layer = ARCHITECTURES.get(model_type, (None, None))
    if same is None:
        gguf = "not supported"
        broken.append(f"GGUF: {model_type} has no llama.cpp architecture in save_gguf")
    elif uniform:
        gguf = same
    elif per_layer is None:
        gguf = "refused"
        broken.append(f"GGUF: {model_type} with per-layer widths cannot be expressed (llama.cpp's deci graph has no "
                      "q/k norms); serve with vLLM, or prune with allocation: uniform")
    else:
        gguf = per_layer
    for name, block in BLOCKS.items():
        odd = [i for i, m in enumerate(ffn) if m % block]
        if odd:
            broken.append(f"GGUF {name}: MLP width of layers {odd[:8]}{'...' if len(odd) > 8 else ''} is not a multiple "
                          f"of {block}; their ffn_down cannot use these types (save_gguf stores it in F16; prune with "
                          f"round_to: {block})")
    max_tp = 1
    for tp in TP_DEGREES:
        if all(k % tp == 0 and h % tp == 0 and m % tp == 0 for k, h, m in zip(kv_heads, heads, ffn)):
            max_tp = tp
        else:
            bad = [i for i, (k, m) in enumerate(zip(kv_heads, ffn)) if k % tp or m % tp]
            broken.append(f"tensor parallel {tp}: layers {bad[:8]}{'...' if len(bad) > 8 else ''} have KV heads or MLP "
                          f"neurons not divisible by {tp} (prune with tp_size: {tp})")
            break
    from . import VLLM_FAMILIES

    vllm = model_type in VLLM_FAMILIES  # what the plugin registers, not what the engine might load one day
    if not vllm:
        broken.append(f"vLLM: no per-layer-width class for {model_type} in the plugin (it registers "
                      f"{', '.join(VLLM_FAMILIES)}); serve it with transformers")
    return {"uniform": uniform, "gguf_architecture": gguf, "max_tp_size": max_tp, "vllm": vllm, "broken": broken}
