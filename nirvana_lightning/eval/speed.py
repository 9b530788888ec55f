"""Parameter counts, analytic FLOPs per token and measured throughput of a (pruned) causal LM.

Everything reads the model's actual tensors, so a physically pruned model (layers of different
widths) is counted as it is, not as its config's global fields say. Peft wrappers are unwrapped
where counting; measurements run the model as given.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import check_positive
from ..families import get_family, unwrap_model
from ..pruning.api import count_parameters


def _distinct_parameters(module: nn.Module) -> dict[int, nn.Parameter]:
    """Parameters keyed by ``id`` so tied tensors (input embedding and LM head) count once."""
    return {id(p): p for p in module.parameters()}


def count_parameters_detailed(model: nn.Module) -> dict[str, int]:
    """Parameter counts by role, every tensor counted once.

    Args:
        model: a supported causal LM, optionally peft-wrapped (LoRA weights, when present, are part
            of ``total`` and ``non_embedding``; merge them first to count the deployed model).

    Returns:
        ``total``: every distinct parameter; ``embeddings``: the input embedding plus the output
        embedding (LM head) when it is not tied to it (tied: counted once); ``non_embedding``:
        ``total - embeddings``; ``block``: the prunable linear weights (q, k, v, o, gate, up, down of
        every layer, weights only, no biases).
    """
    model = unwrap_model(model)
    counts = count_parameters(model)
    embedding_modules = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    embeddings = {id(p): p for m in embedding_modules for p in m.parameters()}
    n_embedding = sum(p.numel() for p in embeddings.values())
    return {"total": counts["total"], "embeddings": n_embedding, "non_embedding": counts["total"] - n_embedding,
            "block": counts["block"]}


def average_causal_context(seq_len: int) -> float:
    """Mean number of keys a query attends to in a causal prefill of ``seq_len`` tokens: ``(T + 1) / 2``."""
    check_positive("seq_len", seq_len)
    return (seq_len + 1) / 2


def flops_per_token(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Analytic forward FLOPs per token of a causal prefill over ``seq_len`` tokens.

    One multiply-accumulate is 2 FLOPs. Shapes are read per layer from the weights, so pruned
    layers of different widths are counted as they are::

        linear    = 2 * sum over layers and roles q, k, v, o, gate, up, down of out_dim * in_dim
                  = 2 * count_parameters(model)["block"]
        attention = sum over layers l of 2 * 2 * n_head_l * head_dim * ctx
                    (QK^T scores and the probability-weighted sum of V: two matmuls of
                    n_head_l * head_dim * ctx multiply-accumulates each; n_head_l is the layer's
                    query-projection rows / head_dim), ctx = (seq_len + 1) / 2, the mean context of
                    a causal prefill (query t attends to t keys)
        lm_head   = 2 * vocab_size * hidden_dim (every position's logits, as a plain forward computes)
        total     = linear + attention + lm_head

    Not counted: biases, norms, activation functions, RoPE, softmax and residual adds (element-wise,
    O(hidden) per token), the embedding lookup (no arithmetic), and unmerged LoRA branches
    (``2 * r * (in_dim + out_dim)`` per adapted projection; merge before measuring speed).
    Sliding-window attention (Mistral) is counted as full causal attention, an upper bound once
    ``seq_len`` exceeds the window.

    Args:
        model: a supported causal LM, optionally peft-wrapped.
        seq_len: prefill length T (>= 1).

    Returns:
        ``{"linear", "attention", "lm_head", "total"}`` in FLOPs per token (floats: ``ctx`` may be
        a half-integer).
    """
    ctx = average_causal_context(seq_len)
    model = unwrap_model(model)
    family = get_family(model)
    linear = 2 * count_parameters(model, family)["block"]
    # every attention block of every layer (T5's decoder: cross-attention over ctx keys too)
    attention = sum(2 * 2 * heads * family.head_dim * ctx for layer in family.layers()
                    for heads, _ in family.attention_widths(layer))
    head = model.get_output_embeddings()
    head_flops = 2 * head.weight.numel() if head is not None else 0
    return {"linear": float(linear), "attention": attention, "lm_head": float(head_flops),
            "total": linear + attention + head_flops}


def kv_cache_bytes(model: nn.Module, batch_size: int, n_token: int) -> int:
    """Analytic size of the keys and values of ``n_token`` positions for ``batch_size`` sequences.

    ``2 * batch_size * n_token * sum over layers of k_out_dim_l * element_size``, with
    ``k_out_dim_l = n_kv_group_l * head_dim`` read from the layer's key projection and the element
    size of the model's dtype. The steady size: a growing cache may briefly hold a copy while it
    is concatenated, and sliding-window caches (Mistral) can be smaller.
    """
    family = get_family(model)
    size = next(lin for _, _, lin in family.block_linears()).weight.element_size()
    # self-attention keys (the first block; T5's cross-attention cache holds the encoder's length instead)
    total = sum(family.attention_widths(layer)[0][1] * family.head_dim * size for layer in family.layers())
    return 2 * batch_size * n_token * total


def weights_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter (tied tensors once) in its stored dtype."""
    return sum(p.numel() * p.element_size() for p in _distinct_parameters(unwrap_model(model)).values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device drained before and after (CUDA runs asynchronously)."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _decode_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                   on_prefilled: Callable[[], None] | None = None) -> torch.Tensor:
    """Greedy decoding with the key/value cache, one forward per new token, no ``generate()``.

    Args:
        prompt: LongTensor ``(B, T)``.
        new_tokens: single-token cached steps after the prefill.
        on_prefilled: called between the prefill and the first step (the timer starts there).

    Returns:
        LongTensor ``(B, new_tokens + 1)``: the prefill's argmax token, then one per step (the
        same tokens as ``generate(max_new_tokens=new_tokens + 1, do_sample=False)``).
    """
    # transformers 5.x renamed the cache argument and output from ``past_key_values`` to ``cache``
    # (the old name is deprecated); use whichever the installed version's forward declares
    name = "cache" if "cache" in inspect.signature(unwrap_model(model).forward).parameters else "past_key_values"

    def cache_of(out) -> object:
        return out[name] if name in out else out["past_key_values"]

    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    tokens = [token]
    cache = cache_of(out)
    if on_prefilled is not None:
        on_prefilled()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache = cache_of(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def _cuda_peak(device: torch.device, run: Callable[[], None]) -> int | None:
    """Peak bytes ``run()`` allocates on ``device`` beyond what was allocated before it; None off CUDA.

    The difference, not the device's absolute peak: during a training run the device also holds the
    optimizer state, gradients, a dense reference model, ..., which are not the measured model's cost.
    """
    if device.type != "cuda":
        run()
        return None
    _synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    _synchronize(device)
    return int(torch.cuda.max_memory_allocated(device)) - before


def measure_throughput(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    new_tokens: int,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict:
    """Measure prefill and cached greedy-decode throughput on random token ids.

    Prefill: one forward over ``(batch_size, seq_len)`` ids with ``use_cache=False`` (full
    logits, as :func:`flops_per_token` counts them). Decode: a prefill of the same ids with the
    cache on, then ``new_tokens`` single-token steps that feed back the argmax token and the cache,
    run by a loop over the model's forward (not ``generate()``, whose heuristics vary between
    versions); only the steps are timed. Every run is under ``torch.inference_mode`` in eval mode
    (``model.training`` is restored after); CUDA is synchronised around each timer. Timings are
    the median of ``repeats`` runs after ``warmup`` untimed ones.

    Args:
        model: a causal LM (optionally peft-wrapped) already on ``device``.
        batch_size / seq_len: the prefill batch, also the decode batch and prompt.
        new_tokens: decode steps (0 skips the decode measurement).
        warmup: untimed runs of each phase first (kernel selection, allocator warm-up).
        repeats: timed runs of each phase.
        device: where the ids go (default: the device of the model's first parameter).
        seed: seed of the random ids (drawn on the CPU, so identical on every device).

    Returns:
        A dict with ``prefill_tokens_per_s`` (``B * T / median seconds``), ``prefill_seconds``,
        ``decode_tokens_per_s`` (``B * new_tokens / median seconds of the steps``; None when
        ``new_tokens`` is 0), ``decode_seconds``; measured memory, CUDA only (else None):
        ``prefill_peak_memory_bytes`` and ``decode_peak_memory_bytes`` (the model's weights plus the
        phase's peak allocation above what the device held before it, so a training run's optimizer
        state, gradients and reference models are not counted) and ``peak_memory_bytes`` (the larger; no CPU
        peak is reported: torch's CPU allocations bypass ``tracemalloc`` and RSS growth mixes in
        the allocator's cache and memory-mapped weights); analytic memory: ``weights_bytes`` (distinct
        parameters) and ``kv_cache_bytes`` (keys and values of ``seq_len + new_tokens`` positions
        for the batch, see :func:`kv_cache_bytes`); and the settings ``batch_size``, ``seq_len``,
        ``new_tokens``, ``repeats``, ``device``, ``dtype``.
    """
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len), ("repeats", repeats)):
        if not isinstance(value, int):
            raise TypeError(f"{key} must be an int, got {value!r}")
        check_positive(key, value)
    for key, value in (("new_tokens", new_tokens), ("warmup", warmup)):
        if not isinstance(value, int):
            raise TypeError(f"{key} must be an int, got {value!r}")
        check_positive(key, value, allow_zero=True)
    base = unwrap_model(model)
    first = next(base.parameters())
    device = torch.device(device) if device is not None else first.device
    vocab = base.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)

    def prefill() -> None:
        model(input_ids=ids, use_cache=False)

    def time_decode() -> float:
        start: list[float] = []

        def mark() -> None:
            _synchronize(device)
            start.append(time.perf_counter())

        _decode_greedy(model, ids, new_tokens, on_prefilled=mark)
        _synchronize(device)
        return time.perf_counter() - start[0]

    was_training = model.training
    model.eval()
    prefill_times: list[float] = []
    decode_times: list[float] = []
    try:
        with torch.inference_mode():
            def run_prefill() -> None:
                for _ in range(warmup):
                    prefill()
                prefill_times.extend(_timed(prefill, device) for _ in range(repeats))

            def run_decode() -> None:
                for _ in range(warmup):
                    time_decode()
                decode_times.extend(time_decode() for _ in range(repeats))

            # the model's own peak: its weights plus what the phase allocates (activations, KV cache)
            weights = weights_bytes(base)
            prefill_peak = _cuda_peak(device, run_prefill)
            decode_peak = _cuda_peak(device, run_decode) if new_tokens > 0 else None
            prefill_peak = None if prefill_peak is None else weights + prefill_peak
            decode_peak = None if decode_peak is None else weights + decode_peak
    finally:
        model.train(was_training)
    prefill_s = statistics.median(prefill_times)
    decode_s = statistics.median(decode_times) if decode_times else None
    return {
        "prefill_tokens_per_s": batch_size * seq_len / prefill_s,
        "prefill_seconds": prefill_s,
        "decode_tokens_per_s": batch_size * new_tokens / decode_s if decode_s is not None else None,
        "decode_seconds": decode_s,
        "peak_memory_bytes": None if prefill_peak is None else max(prefill_peak, decode_peak or 0),
        "prefill_peak_memory_bytes": prefill_peak,
        "decode_peak_memory_bytes": decode_peak,
        "weights_bytes": weights_bytes(base),
        "kv_cache_bytes": kv_cache_bytes(base, batch_size, seq_len + new_tokens),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "device": str(device),
        "dtype": str(first.dtype).removeprefix("torch."),
    }


__all__ = [
    "average_causal_context", "count_parameters_detailed", "flops_per_token", "kv_cache_bytes", "measure_throughput",
    "weights_bytes",
]
