"""Run vLLM and llama.cpp on an export and collect greedy tokens and log-probabilities.

These are the measuring instruments of the serving tests and ``benchmarks/serving.py``. They run in
the serving environment (``scripts/setup_serving.sh``: vLLM pins an older transformers, so it lives
in its own virtual environment) and talk to the caller through JSON files::

    .venv-serve/bin/python -m nirvana_lightning.serving.engines vllm  --model DIR       --requests R.json --out O.json
    .venv-serve/bin/python -m nirvana_lightning.serving.engines llama --model FILE.gguf --requests R.json --out O.json

``R.json``: ``{"prompts": [[token ids], ...], "max_tokens": 32, "prompt_logprobs": true, "timing": false}``.
``O.json``: per prompt, the generated token ids, each generated token's log-probability, and (when asked)
each prompt token's log-probability under the engine (the first has none); ``startup_s``; timings when asked.

Only greedy decoding (temperature 0) is used, in float32 where the engine allows, so that the tokens
can be compared with transformers' exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any


def _logprob_of(entry: dict | None, token: int) -> float | None:
    if not entry or token not in entry:
        return None
    value = entry[token]
    return float(getattr(value, "logprob", value))


def run_vllm(model: str, prompts: list[list[int]], max_tokens: int, *, prompt_logprobs: bool = True,
             dtype: str = "float32", timing: bool = False) -> dict[str, Any]:
    """Greedy generation with ``vllm.LLM`` (the nirvana plugin is loaded by vLLM's entry points)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, seed=0, max_model_len=max(256, max(len(p) for p in prompts) + max_tokens + 8),
              enforce_eager=True, trust_remote_code=False)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True,
                            prompt_logprobs=0 if prompt_logprobs else None)
    inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    results = []
    for prompt, out in zip(prompts, outputs):
        gen = out.outputs[0]
        tokens = list(gen.token_ids)
        result: dict[str, Any] = {
            "tokens": tokens,
            "token_logprobs": [_logprob_of(lp, t) for lp, t in zip(gen.logprobs or [], tokens)],
        }
        if prompt_logprobs:
            result["prompt_logprobs"] = [None] + [_logprob_of(lp, t) for lp, t in
                                                  zip((out.prompt_logprobs or [])[1:], prompt[1:])]
        results.append(result)
    report: dict[str, Any] = {"engine": "vllm", "results": results, "startup_s": startup}
    if timing:
        report["timing"] = _vllm_timing(llm, SamplingParams, TokensPrompt, prompts)
    return report


def _vllm_timing(llm, SamplingParams, TokensPrompt, prompts: list[list[int]], rounds: int = 3) -> dict[str, float]:
    """Prefill tokens/s (1 generated token) and decode tokens/s (128 generated tokens), batch 1, best of rounds."""
    prompt = TokensPrompt(prompt_token_ids=list(prompts[0]))
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True), use_tqdm=False)
        decode = time.perf_counter() - t - prefill
        best_prefill = max(best_prefill, len(prompts[0]) / prefill)
        best_decode = max(best_decode, 128 / max(decode, 1e-9))
    return {"prefill_tok_s": best_prefill, "decode_tok_s": best_decode}


class LlamaServer:
    """llama.cpp's own server (the ``xllamacpp`` wheel), loaded on a local port, for exact token ids.

    Exact comparisons want an f32 KV cache and flash attention off (llama.cpp defaults otherwise
    produce near-tie flips); ``/completion`` with ``return_tokens`` gives the generated token ids,
    which the OpenAI-style endpoint does not when a token is a partial UTF-8 piece.
    """

    def __init__(self, gguf: str, *, n_ctx: int = 2048, threads: int | None = None, exact: bool = True) -> None:
        import socket

        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.n_predict = -1
        params.warmup = False
        params.cpuparams.n_threads = threads or os.cpu_count() or 1
        params.cpuparams_batch.n_threads = threads or os.cpu_count() or 1
        if exact:
            params.cache_type_k = xlc.ggml_type.GGML_TYPE_F32
            params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
            params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        params.hostname = "127.0.0.1"
        params.port = self.port
        start = time.perf_counter()
        self.server = xlc.Server(params)
        self.startup_s = time.perf_counter() - start
        self.base = f"http://127.0.0.1:{self.port}"

    def request(self, endpoint: str, body: dict) -> dict:
        import urllib.request

        req = urllib.request.Request(self.base + endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())

    def completion(self, prompt: list[int], max_tokens: int, n_probs: int = 1) -> dict:
        return self.request("/completion", {
            "prompt": list(prompt), "n_predict": max_tokens, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
            "cache_prompt": False, "return_tokens": True, "n_probs": n_probs, "ignore_eos": True,
            "post_sampling_probs": False,
        })

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.request("/tokenize", {"content": text, "add_special": add_special})["tokens"]


def _probs_logprob(entry: dict) -> float | None:
    """Log-probability of the chosen token in one ``completion_probabilities`` entry."""
    if "logprob" in entry:
        return float(entry["logprob"])
    if "prob" in entry:
        return math.log(entry["prob"]) if entry["prob"] > 0 else float("-inf")
    return None


def run_llamacpp(gguf: str, prompts: list[list[int]], max_tokens: int, *, prompt_logprobs: bool = True,
                 timing: bool = False, texts: list[str] | None = None) -> dict[str, Any]:
    """Greedy generation with llama.cpp's server; prompt log-probabilities by teacher forcing."""
    server = LlamaServer(gguf, n_ctx=max(len(p) for p in prompts) + max_tokens + 16)
    results = []
    for prompt in prompts:
        out = server.completion(prompt, max_tokens)
        probs = out.get("completion_probabilities") or []
        result: dict[str, Any] = {"tokens": list(out["tokens"]),
                                  "token_logprobs": [_probs_logprob(p) for p in probs]}
        if prompt_logprobs:
            result["prompt_logprobs"] = [None] + _llamacpp_prompt_logprobs(server, prompt)
        results.append(result)
    report: dict[str, Any] = {"engine": "llama.cpp", "results": results, "startup_s": server.startup_s}
    if texts is not None:
        report["tokenized"] = [server.tokenize(t) for t in texts]
    if timing:
        report["timing"] = _llamacpp_timing(server, prompts[0])
    return report


def _llamacpp_prompt_logprobs(server: LlamaServer, prompt: list[int]) -> list[float | None]:
    """log p(prompt[i] | prompt[:i]) for i >= 1, one short request per position with the prompt cached.

    llama.cpp's server has no prompt-logprob option; ``n_probs`` over the whole vocabulary of one
    generated token gives the full next-token distribution after each prefix.
    """
    n_vocab = int(server.request("/props", {}).get("n_vocab", 0) or 0) if False else None  # noqa: F841
    out: list[float | None] = []
    for i in range(1, len(prompt)):
        resp = server.request("/completion", {
            "prompt": list(prompt[:i]), "n_predict": 1, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
            "cache_prompt": True, "return_tokens": True, "n_probs": 0, "ignore_eos": True,
            "logit_bias": [], "post_sampling_probs": False, "n_indent": 0,
        })
        out.append(_target_logprob(server, prompt[:i], prompt[i], resp))
    return out


def _target_logprob(server: LlamaServer, prefix: list[int], target: int, resp: dict) -> float | None:
    # Force the target token: restrict sampling to it with a logit bias is not exact; instead ask the
    # top-n list large enough to contain it and read its log-probability (pre-sampling values).
    for n in (20, 200, 2000):
        resp = server.request("/completion", {
            "prompt": list(prefix), "n_predict": 1, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
            "cache_prompt": True, "return_tokens": True, "n_probs": n, "ignore_eos": True,
            "post_sampling_probs": False,
        })
        probs = resp.get("completion_probabilities") or []
        if probs:
            for cand in probs[0].get("top_logprobs", probs[0].get("top_probs", [])):
                if int(cand.get("id", -1)) == int(target):
                    return _probs_logprob(cand)
    return None


def _llamacpp_timing(server: LlamaServer, prompt: list[int], rounds: int = 3) -> dict[str, float]:
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(rounds):
        out = server.request("/completion", {"prompt": list(prompt), "n_predict": 128, "temperature": 0.0,
                                             "top_k": 1, "samplers": ["top_k"], "cache_prompt": False,
                                             "ignore_eos": True})
        t = out.get("timings", {})
        best_prefill = max(best_prefill, float(t.get("prompt_per_second", 0.0)))
        best_decode = max(best_decode, float(t.get("predicted_per_second", 0.0)))
    return {"prefill_tok_s": best_prefill, "decode_tok_s": best_decode}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nirvana_lightning.serving.engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=("vllm", "llama"))
    parser.add_argument("--model", required=True, help="export directory (vllm) or GGUF file (llama)")
    parser.add_argument("--requests", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    req = json.loads(args.requests.read_text())
    common = dict(prompt_logprobs=req.get("prompt_logprobs", True), timing=req.get("timing", False))
    if args.engine == "vllm":
        report = run_vllm(args.model, req["prompts"], req["max_tokens"], dtype=req.get("dtype", "float32"), **common)
    else:
        report = run_llamacpp(args.model, req["prompts"], req["max_tokens"], texts=req.get("texts"), **common)
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
