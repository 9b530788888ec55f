"""Run vLLM and llama.cpp on an export and collect greedy tokens and log-probabilities.

These are the measuring instruments of the serving tests and ``benchmarks/serving.py``. They run in
the serving environment (``scripts/setup_serving.sh``: vLLM pins an older transformers, so it lives
in its own virtual environment) and talk to the caller through JSON files::

    .venv-serve/bin/python -m nirvana_lightning.serving.engines vllm  --model DIR       --requests R.json --out O.json
    .venv-serve/bin/python -m nirvana_lightning.serving.engines llama --model FILE.gguf --requests R.json --out O.json

``R.json``: ``{"prompts": [[token ids], ...], "max_tokens": 32, "prompt_logprobs": true, "timing": false,
"score": [[token ids], ...]}`` (``score``: windows whose token log-probabilities are returned as ``scores``,
for perplexity; llama.cpp also takes ``threads`` and ``exact``).
``O.json``: per prompt, the generated token ids, each generated token's log-probability, and (when asked)
each prompt token's log-probability under the engine (the first has none); ``startup_s``; timings when asked.

Only greedy decoding (temperature 0) is used, in float32 where the engine allows, so that the tokens
can be compared with transformers' exactly.
"""

from __future__ import annotations

import argparse
import json
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
             dtype: str = "float32", timing: bool = False, score: list[list[int]] | None = None) -> dict[str, Any]:
    """Greedy generation with ``vllm.LLM`` (the nirvana plugin is loaded by vLLM's entry points)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # engine core and worker in this process (no spawned process re-importing vLLM twice, ~20 s saved on CPU);
    # the tokens and log-probabilities are those of the multi-process engine
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    longest = max(len(p) for p in [*prompts, *(score or [])])
    llm = LLM(model=model, dtype=dtype, seed=0, max_model_len=max(512, longest + max_tokens + 8),
              enforce_eager=True, trust_remote_code=False, distributed_executor_backend="uni")
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
    if score:
        scored = llm.generate([TokensPrompt(prompt_token_ids=list(w)) for w in score],
                              SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        report["scores"] = [[_logprob_of(lp, t) for lp, t in zip((o.prompt_logprobs or [])[1:], w[1:])]
                            for o, w in zip(scored, score)]
    if timing:
        report["timing"] = _vllm_timing(llm, SamplingParams, TokensPrompt, prompts)
    return report


def _vllm_timing(llm, SamplingParams, TokensPrompt, prompts: list[list[int]], rounds: int = 3) -> dict[str, float]:
    """Prefill tokens/s (1 generated token) and decode tokens/s (128 more tokens), batch 1, best of rounds.

    The prompt is the longest of ``prompts``; the decode time is the 129-token run minus the 1-token run.
    """
    longest = max(prompts, key=len)
    prompt = TokensPrompt(prompt_token_ids=list(longest))
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True), use_tqdm=False)
        decode = time.perf_counter() - t - prefill
        best_prefill = max(best_prefill, len(longest) / prefill)
        best_decode = max(best_decode, 128 / max(decode, 1e-9))
    return {"prefill_tok_s": best_prefill, "decode_tok_s": best_decode}


class LlamaServer:
    """llama.cpp's own server (the ``xllamacpp`` wheel) on a local port.

    Exact comparisons want an f32 KV cache and flash attention off (llama.cpp's defaults give
    near-tie flips); ``/completion`` with ``return_tokens`` gives the generated token ids, which the
    OpenAI-style endpoint leaves out when a token is a partial UTF-8 piece.
    """

    def __init__(self, gguf: str, *, n_ctx: int = 2048, threads: int | None = None, exact: bool = True) -> None:
        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.warmup = False
        if threads:
            params.cpuparams.n_threads = threads
            params.cpuparams_batch.n_threads = threads
        if exact:
            params.cache_type_k = xlc.ggml_type.GGML_TYPE_F32
            params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
            params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        start = time.perf_counter()
        try:
            self.server = xlc.Server(params)
        except RuntimeError as err:
            raise RuntimeError(f"llama.cpp could not load {gguf} (its log above says why): {err}") from None
        self.startup_s = time.perf_counter() - start
        address = self.server.listening_address
        self.base = address if address.startswith("http") else f"http://{address}"

    def request(self, endpoint: str, body: dict) -> dict:
        import urllib.request

        req = urllib.request.Request(self.base + endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())

    def completion(self, prompt: list[int], max_tokens: int, *, n_probs: int = 0, cache_prompt: bool = False,
                   **extra) -> dict:
        """Greedy continuation (temperature 0); stops at an end-of-generation token like any llama.cpp client.

        ``n_probs``: the top-n next-token log-probabilities of the model (before the sampler chain).
        """
        return self.request("/completion", {
            "prompt": list(prompt), "n_predict": max_tokens, "temperature": 0.0, "cache_prompt": cache_prompt,
            "return_tokens": True, "n_probs": n_probs, "post_sampling_probs": False, **extra,
        })

    def next_token_logprob(self, prefix: list[int], target: int, widths: tuple[int, ...] = (16, 1024)) -> float:
        """log p(target | prefix) from llama.cpp's next-token distribution (the server has no prompt logprobs).

        The top-n list is widened until it holds ``target`` (last: the whole vocabulary); the prefix stays
        in the KV cache between calls, so each call evaluates one new token.
        """
        for n in (*widths, self.n_vocab):
            # The server sends no distribution when the sampled token ends the reply (end of generation) or
            # is part of a UTF-8 character; a logit bias makes the sampled token a plain "a". The reported
            # values are the model's own softmax, taken before the sampler chain and its biases.
            out = self.completion(prefix, 1, n_probs=n, cache_prompt=True, logit_bias=[[self.plain_token, 1000.0]])
            for cand in out["completion_probabilities"][0]["top_logprobs"]:
                if int(cand["id"]) == int(target):
                    return float(cand["logprob"])
        raise RuntimeError(f"token {target} missing from llama.cpp's full next-token distribution")

    @property
    def plain_token(self) -> int:
        if not hasattr(self, "_plain"):
            self._plain = self.tokenize("a")[0]
        return self._plain

    @property
    def n_vocab(self) -> int:
        if not hasattr(self, "_n_vocab"):
            props = self.request_get("/props")
            self._n_vocab = int(props.get("model_info", {}).get("n_vocab") or props.get("n_vocab") or 0) or 1 << 20
        return self._n_vocab

    def request_get(self, endpoint: str) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.base + endpoint, timeout=60) as resp:
            return json.loads(resp.read())

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.request("/tokenize", {"content": text, "add_special": add_special})["tokens"]


def run_llamacpp(gguf: str, prompts: list[list[int]], max_tokens: int, *, prompt_logprobs: bool = True,
                 timing: bool = False, texts: list[str] | None = None, threads: int | None = None,
                 exact: bool = True, score: list[list[int]] | None = None) -> dict[str, Any]:
    """Greedy generation with llama.cpp's server; prompt log-probabilities one position at a time."""
    longest = max(len(p) for p in [*prompts, *(score or [])])
    server = LlamaServer(gguf, n_ctx=max(512, longest + max_tokens + 16), threads=threads, exact=exact)
    results = []
    for prompt in prompts:
        tokens = list(server.completion(prompt, max_tokens)["tokens"])
        # the log-probability of each chosen token under the model (before sampling), teacher-forced: the
        # completion's own n_probs values are those of the greedy sampler chain, not the model's
        seq = list(prompt) + tokens
        result: dict[str, Any] = {
            "tokens": tokens,
            "token_logprobs": [server.next_token_logprob(seq[:i], seq[i]) for i in range(len(prompt), len(seq))],
        }
        if prompt_logprobs:
            result["prompt_logprobs"] = [None] + [server.next_token_logprob(prompt[:i], prompt[i])
                                                  for i in range(1, len(prompt))]
        results.append(result)
    report: dict[str, Any] = {"engine": "llama.cpp", "results": results, "startup_s": server.startup_s}
    if score:
        report["scores"] = [[server.next_token_logprob(list(w[:i]), w[i]) for i in range(1, len(w))] for w in score]
    if texts is not None:
        report["tokenized"] = [server.tokenize(t) for t in texts]
    if timing:
        report["timing"] = _llamacpp_timing(server, max(prompts, key=len))
    return report


def _llamacpp_timing(server: LlamaServer, prompt: list[int], rounds: int = 3) -> dict[str, float]:
    """Prefill and decode tokens/s from llama.cpp's own timings (batch 1, 128 tokens decoded), best of rounds."""
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(rounds):
        out = server.completion(prompt, 128, ignore_eos=True)
        t = out.get("timings", {})
        best_prefill = max(best_prefill, float(t.get("prompt_per_second", 0.0)))
        best_decode = max(best_decode, float(t.get("predicted_per_second", 0.0)))
    return {"prefill_tok_s": best_prefill, "decode_tok_s": best_decode}


# ----------------------------------------------------------------------------- reference and comparison
def reference_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[dict[str, Any]]:
    """transformers' greedy continuation (never stopping at EOS) and float64 log-probabilities.

    ``tokens``/``token_logprobs``: the generated tokens and their log-probabilities; ``prompt_logprobs``:
    log p(prompt[i] | prompt[:i]) with None first, as the engine runners report them.
    """
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            lp = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
            n = len(prompt)
            out.append({"tokens": ids[n:], "token_logprobs": lp[n:], "prompt_logprobs": lp[:n]})
    return out


def compare(reference: list[dict], report: dict, eog: set[int] = frozenset()) -> dict[str, Any]:
    """Greedy tokens equal? Largest |log-prob difference| over generated and prompt tokens.

    An engine may stop early only at an end-of-generation token (``eog``) that the reference also chose.
    Log-probabilities are compared while the tokens agree; ``n_compared`` counts them, and a missing
    result, a missing log-probability or a length mismatch raises instead of passing vacuously.
    """
    results = report["results"]
    if len(results) != len(reference):
        raise ValueError(f"{report.get('engine')}: {len(results)} results for {len(reference)} prompts")
    tokens_equal, gen_diff, prompt_diff, n_compared = [], 0.0, 0.0, 0
    for ref, got in zip(reference, results):
        toks, ref_toks = got["tokens"], ref["tokens"]
        same = toks == ref_toks or (len(toks) < len(ref_toks) and toks == ref_toks[:len(toks)]
                                    and bool(toks) and toks[-1] in eog)
        tokens_equal.append(same)
        if len(got["token_logprobs"]) != len(toks):
            raise ValueError(f"{report.get('engine')}: {len(got['token_logprobs'])} log-probs for {len(toks)} tokens")
        for a, b, t1, t2 in zip(got["token_logprobs"], ref["token_logprobs"], toks, ref_toks):
            if t1 != t2:
                break
            if a is None:
                raise ValueError(f"{report.get('engine')}: no log-probability for generated token {t1}")
            gen_diff, n_compared = max(gen_diff, abs(a - b)), n_compared + 1
        prompt_lp = got.get("prompt_logprobs")
        if prompt_lp is not None:
            if len(prompt_lp) != len(ref["prompt_logprobs"]) or any(a is None for a in prompt_lp[1:]):
                raise ValueError(f"{report.get('engine')}: prompt log-probs missing or of the wrong length")
            for a, b in zip(prompt_lp[1:], ref["prompt_logprobs"][1:]):
                prompt_diff, n_compared = max(prompt_diff, abs(a - b)), n_compared + 1
    return {"tokens_equal": tokens_equal, "max_token_logprob_diff": gen_diff, "max_prompt_logprob_diff": prompt_diff,
            "n_compared": n_compared}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nirvana_lightning.serving.engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=("vllm", "llama"))
    parser.add_argument("--model", required=True, help="export directory (vllm) or GGUF file (llama)")
    parser.add_argument("--requests", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    req = json.loads(args.requests.read_text())
    common = dict(prompt_logprobs=req.get("prompt_logprobs", True), timing=req.get("timing", False),
                  score=req.get("score"))
    if args.engine == "vllm":
        report = run_vllm(args.model, req["prompts"], req["max_tokens"], dtype=req.get("dtype", "float32"), **common)
    else:
        report = run_llamacpp(args.model, req["prompts"], req["max_tokens"], texts=req.get("texts"),
                              threads=req.get("threads"), exact=req.get("exact", True), **common)
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
