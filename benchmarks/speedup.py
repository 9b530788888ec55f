"""Prefill and decode speed of dense vs physically pruned SmolLM2: measured speedup vs the FLOP ratio.

Purpose: check that structured pruning (whole KV groups and MLP neurons cut out of the tensors)
turns into wall-clock speed, against the requirement "at 50% sparsity the measured prefill
speedup is at least 0.8 x the ideal FLOP ratio".

Command (from the repository root; ~5 min on 2 CPU cores):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/speedup.py

GPU, bf16: add ``--device cuda --dtype bfloat16`` (scoring still runs once on the CPU in fp32).

Protocol.
    models       the dense model and one pruned copy per ``--sparsities`` (0.2 0.5), all in
                 memory at once, loaded in ``--dtype`` and moved to ``--device``.
    pruning      criterion ``--criterion nirvana`` scored once in fp32 on the CPU on
                 ``--n-calibration 8`` windows x ``--calibration-seq-len 128`` tokens drawn with
                 ``sample_windows(seed=--seed 0)`` from the train side of a 90/10 document split
                 of the shipped Brown corpus (as benchmarks/quality.py with fewer windows: speed
                 depends only on the kept widths per layer, not on which units are kept, so a
                 small calibration set that gives the method's uneven per-layer widths suffices);
                 then ``plan_from_scores`` per sparsity with global
                 allocation, ``--gamma 3.0`` and ``--round-to 8`` as configs/quickstart.yaml, and
                 ``apply_plan`` on a deep copy (physical slicing, layers of different widths).
    FLOPs        ``flops_per_token(model, --prefill-seq-len)``: 2 x multiply-accumulates of the
                 block projections, causal attention (mean context (T + 1) / 2) and the LM head;
                 ideal speedup = dense FLOPs / pruned FLOPs (the LM head, which pruning does not
                 shrink, is in both).
    prefill      ``measure_throughput`` on ``--prefill-batch-size 4`` x ``--prefill-seq-len 256``
                 random ids, one forward with full logits, no cache.
    decode       ``measure_throughput`` on ``--decode-batch-size 1`` x ``--prompt-len 128`` random
                 ids, then ``--new-tokens 64`` greedy single-token steps with the KV cache (only
                 the steps are timed).
    schedule     one untimed warm-up pass over every model, then ``--rounds`` rounds; each round
                 measures every model in turn (dense, pruned 0.2, pruned 0.5, dense, ...), so
                 drifts in machine load hit every model alike; per model the median over rounds.
                 Thread count: torch's default (printed).
    memory       weights and KV cache (decode batch, prompt + new tokens) are analytic bytes;
                 peaks are ``torch.cuda.max_memory_allocated`` (weights included), CUDA only.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time

import torch
from torch import nn

from nirvana_lightning import apply_plan, compute_unit_scores, load_model
from nirvana_lightning.data import leading_bos, read_records, sample_windows, split_documents, start_with_bos
from nirvana_lightning.eval.speed import count_parameters_detailed, flops_per_token, measure_throughput
from nirvana_lightning.loading import DTYPES
from nirvana_lightning.pruning import CRITERIA, PruningPlan, plan_from_scores
from nirvana_lightning.pruning.gradients import fingerprint

START = time.perf_counter()
MIB = 2**20


def log(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[speedup {time.perf_counter() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


def build_calibration(tokenizer, args: argparse.Namespace) -> torch.Tensor:
    """``(N, T)`` windows from the train documents of the Brown split (tokenised without special tokens, EOS-joined)."""
    docs = read_records("brown")
    train_idx, _ = split_documents(len(docs), args.val_fraction, seed=args.split_seed)
    ids = tokenizer([docs[i]["text"] for i in train_idx], add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream = torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)
    return start_with_bos(sample_windows(stream, args.n_calibration, args.calibration_seq_len, args.seed),
                          leading_bos(tokenizer))


def build_plans(model: nn.Module, tokenizer, args: argparse.Namespace) -> list[PruningPlan]:
    """Score once (fp32, CPU), then one plan per sparsity."""
    calibration = None
    provenance = {"criterion": args.criterion, "seed": args.seed}
    if args.criterion in ("nirvana", "taylor"):
        calibration = build_calibration(tokenizer, args)
        provenance.update(calibration_fingerprint=fingerprint([calibration]),
                          calibration_shape=list(calibration.shape))
    start = time.perf_counter()
    scores = compute_unit_scores(model, calibration if calibration is not None else [], criterion=args.criterion,
                                 seed=args.seed, granularity=args.granularity)
    log(f"{args.criterion}: scored in {time.perf_counter() - start:.0f} s"
        + (f" on calibration {tuple(calibration.shape)}" if calibration is not None else ""))
    return [plan_from_scores(model, scores, sparsity=s, gamma=args.gamma, round_to=args.round_to,
                             attention_granularity=args.granularity, provenance=provenance) for s in args.sparsities]


def achieved_gflops(flops: float, tokens_per_s: float) -> float:
    return flops * tokens_per_s / 1e9


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model source for load_model")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5], help="block-weight sparsities")
    parser.add_argument("--criterion", choices=CRITERIA, default="nirvana", help="saliency criterion")
    parser.add_argument("--gamma", type=float, default=3.0, help="MLP-to-attention pruning-fraction ratio")
    parser.add_argument("--granularity", choices=["group", "query_head"], default="group",
                        help="attention granularity (query_head: single query heads inside KV groups too)")
    parser.add_argument("--round-to", type=int, default=8, help="kept MLP width per layer rounded up to this multiple")
    parser.add_argument("--n-calibration", type=int, default=8, help="calibration windows")
    parser.add_argument("--calibration-seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of 'random'")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents held out")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the document split")
    parser.add_argument("--prefill-batch-size", type=int, default=4, help="sequences per prefill forward")
    parser.add_argument("--prefill-seq-len", type=int, default=256, help="tokens per prefill sequence")
    parser.add_argument("--decode-batch-size", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--new-tokens", type=int, default=64, help="timed single-token decode steps")
    parser.add_argument("--rounds", type=int, default=5, help="measurement rounds (each measures every model)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default, one per core); 1 gives stable "
                             "numbers when another job holds a core, where OpenMP threads would wait on each other")
    parser.add_argument("--device", default="cpu", help="torch device of the measurements (e.g. cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the measured models")
    parser.add_argument("--check-sparsity", type=float, default=0.5, help="sparsity of the speedup check")
    parser.add_argument("--check-factor", type=float, default=0.8,
                        help="required measured prefill speedup as a fraction of the FLOP ratio")
    args = parser.parse_args(argv)
    if args.check_sparsity not in args.sparsities:
        parser.error(f"--check-sparsity {args.check_sparsity} must be one of --sparsities {args.sparsities}")
    command = shlex.join([".venv/bin/python", "benchmarks/speedup.py", *(sys.argv[1:] if argv is None else argv)])
    command = f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {command}"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    scoring_model, tokenizer = load_model(args.model)  # fp32, CPU
    plans = build_plans(scoring_model, tokenizer, args)
    dense = scoring_model if args.dtype == "float32" else load_model(args.model, args.dtype)[0]
    if dense is not scoring_model:
        del scoring_model
    names = ["dense"] + [f"pruned {s:g}" for s in args.sparsities]
    models: dict[str, nn.Module] = {"dense": dense}
    for name, plan in zip(names[1:], plans):
        models[name] = copy.deepcopy(dense)
        apply_plan(models[name], plan)
    device = torch.device(args.device)
    for model in models.values():
        model.to(device)
    counts = {n: count_parameters_detailed(m) for n, m in models.items()}
    flops = {n: flops_per_token(m, args.prefill_seq_len) for n, m in models.items()}
    log("models ready: " + ", ".join(f"{n} {c['total']:,} params" for n, c in counts.items()))

    def measure(model: nn.Module) -> tuple[dict, dict]:
        prefill = measure_throughput(model, batch_size=args.prefill_batch_size, seq_len=args.prefill_seq_len,
                                     new_tokens=0, warmup=0, repeats=1, device=device)
        decode = measure_throughput(model, batch_size=args.decode_batch_size, seq_len=args.prompt_len,
                                    new_tokens=args.new_tokens, warmup=0, repeats=1, device=device)
        return prefill, decode

    for model in models.values():  # warm-up: allocator, kernel selection, weights paged in
        measure(model)
    log("warm-up done")
    prefill_runs: dict[str, list[dict]] = {n: [] for n in models}
    decode_runs: dict[str, list[dict]] = {n: [] for n in models}
    for r in range(args.rounds):
        for name, model in models.items():
            prefill, decode = measure(model)
            prefill_runs[name].append(prefill)
            decode_runs[name].append(decode)
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {prefill_runs[n][-1]['prefill_tokens_per_s']:,.0f} / {decode_runs[n][-1]['decode_tokens_per_s']:.1f}"
            for n in models) + " tok/s (prefill / decode)")

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    def spread(runs: list[dict], key: str) -> float:
        values = [run[key] for run in runs]
        return (max(values) - min(values)) / statistics.median(values)

    def peak(runs: list[dict], key: str) -> int | None:
        values = [run[key] for run in runs if run[key] is not None]
        return max(values) if values else None

    prefill_tps = {n: median(prefill_runs[n], "prefill_tokens_per_s") for n in models}
    decode_tps = {n: median(decode_runs[n], "decode_tokens_per_s") for n in models}
    speedup = {n: prefill_tps[n] / prefill_tps["dense"] for n in models}
    ideal = {n: flops["dense"]["total"] / flops[n]["total"] for n in models}
    first = decode_runs["dense"][0]
    load_end = os.getloadavg()

    print(f"\n## Speedup of physically pruned {args.model}: {first['dtype']} on {first['device']}, "
          f"{torch.get_num_threads()} threads, {args.criterion} (gamma {args.gamma:g}, round_to {args.round_to}, "
          + (f"calibration {args.n_calibration} x {args.calibration_seq_len} Brown tokens), "
             if args.criterion in ("nirvana", "taylor") else "no calibration), ")
          + f"median of {args.rounds} alternating rounds\n")
    print(f"prefill: batch {args.prefill_batch_size} x {args.prefill_seq_len} tokens, full logits, no cache; "
          f"decode: batch {args.decode_batch_size}, {args.new_tokens} greedy cached steps after a "
          f"{args.prompt_len}-token prompt\n")
    print("| model | realised block sparsity | params total | params non-embedding | GFLOPs/token (prefill) "
          "| ideal speedup (FLOP ratio) | prefill tok/s | measured prefill speedup | measured / ideal "
          "| achieved GFLOP/s | decode tok/s | decode speedup | weights MiB | KV cache MiB (decode) "
          "| peak MiB prefill / decode |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, name in enumerate(models):
        c, f = counts[name], flops[name]
        sparsity = 0.0 if i == 0 else plans[i - 1].realised_sparsity
        p_runs, d_runs = prefill_runs[name], decode_runs[name]
        print(f"| {name} | {sparsity:.4f} | {c['total']:,} | {c['non_embedding']:,} | {f['total'] / 1e9:.4f} | "
              f"{ideal[name]:.3f} | {prefill_tps[name]:,.0f} (±{spread(p_runs, 'prefill_tokens_per_s') / 2:.0%}) | "
              f"{speedup[name]:.3f} | {speedup[name] / ideal[name]:.3f} | "
              f"{achieved_gflops(f['total'], prefill_tps[name]):.1f} | "
              f"{decode_tps[name]:.1f} (±{spread(d_runs, 'decode_tokens_per_s') / 2:.0%}) | "
              f"{decode_tps[name] / decode_tps['dense']:.3f} | {fmt_bytes(d_runs[0]['weights_bytes'])} | "
              f"{fmt_bytes(d_runs[0]['kv_cache_bytes'])} | "
              f"{fmt_bytes(peak(p_runs, 'prefill_peak_memory_bytes'))} / "
              f"{fmt_bytes(peak(d_runs, 'decode_peak_memory_bytes'))} |")
    print("\n(± is half the max-min range over rounds, relative to the median)")

    print("\nFLOPs per token by part (GFLOPs; share of the model's total):\n")
    print("| model | block linear | attention (ctx (T+1)/2) | LM head |")
    print("|---|---|---|---|")
    for name in models:
        f = flops[name]
        print(f"| {name} | " + " | ".join(f"{f[k] / 1e9:.4f} ({f[k] / f['total']:.1%})"
                                            for k in ("linear", "attention", "lm_head")) + " |")
    for name, plan in zip(names[1:], plans):
        print(f"{name}: KV groups per layer {min(plan.n_kv_group_after)}-{max(plan.n_kv_group_after)} "
              f"(of {max(plan.n_kv_group_before)}), query heads per layer {min(plan.n_head_after)}-"
              f"{max(plan.n_head_after)} (of {max(plan.n_head_before)}), MLP width per layer {min(plan.mlp_dim_after)}-"
              f"{max(plan.mlp_dim_after)} (of {max(plan.mlp_dim_before)})")

    check = names[1 + args.sparsities.index(args.check_sparsity)]
    target = args.check_factor * ideal[check]
    verdict = "PASS" if speedup[check] >= target else "MISS"
    print(f"\nat {args.check_sparsity:.0%} sparsity measured prefill speedup {speedup[check]:.2f} vs "
          f"{args.check_factor:g} x FLOP ratio {target:.2f}: {verdict}")
    if verdict == "MISS":
        f_dense, f_pruned = flops["dense"], flops[check]
        efficiency = achieved_gflops(f_pruned["total"], prefill_tps[check]) / achieved_gflops(
            f_dense["total"], prefill_tps["dense"])
        print("likely explanation:")
        print(f"  LM head share of FLOPs: dense {f_dense['lm_head'] / f_dense['total']:.1%}, pruned "
              f"{f_pruned['lm_head'] / f_pruned['total']:.1%} (already in the ideal ratio; its time share may be "
              "larger than its FLOP share: a (B*T, V) fp32 logits write is memory-bound)")
        print(f"  achieved GFLOP/s pruned / dense: {efficiency:.3f} (< 1: the narrower, odd-sized per-layer "
              "matmuls run less efficiently, or element-wise work (norms, RoPE, softmax, SiLU) that the "
              "FLOP count omits takes a larger share)")
        busy = max(load_start[0], load_end[0]) > (os.cpu_count() or 1) + 0.5
        print(f"  threads {torch.get_num_threads()} on {os.cpu_count()} CPUs; load average (1 min) at start "
              f"{load_start[0]:.2f}, at end {load_end[0]:.2f}"
              + (": OVERSUBSCRIBED, other processes held cores, so threads waited on each other at every "
                 "parallel region, a fixed cost per matmul that pruning does not shrink; rerun on an idle "
                 "machine or with --threads 1" if busy else ""))
    print(f"\nload average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; "
          f"{os.cpu_count()} CPUs")
    print(f"command: {command}")
    print(f"total wall time {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
