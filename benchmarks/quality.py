"""Quality of pruned SmolLM2 per criterion and sparsity: held-out perplexity, KL to the dense model, params kept.

Purpose: compare the NIRVANA saliency with the magnitude, taylor (SNIP) and random baselines under
the same calibration, allocation and evaluation, without ever copying the model: each plan is
evaluated through ``masked_units`` (which computes exactly what the sliced model would).

Command (from the repository root; ~10 min on 2 CPU cores):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/quality.py

Protocol.
    data         the shipped Brown corpus, split by document with
                 ``split_documents(n_doc, --val-fraction 0.1, seed=--split-seed 0)``.
    calibration  ``--n-calibration 32`` windows x ``--calibration-seq-len 128`` tokens drawn with
                 ``sample_windows(seed=--seed 0)`` from the TRAIN documents (tokenised without
                 special tokens, joined by EOS; a tokenizer whose encoding starts with BOS, as Gemma's,
                 gets BOS as every window's first token); the same windows for every criterion.
    scoring      ``compute_unit_scores`` once per criterion (library defaults: lean, checkpointed,
                 chunked head; fp32), then ``plan_from_scores`` for every sparsity. These are the
                 two steps of ``make_plan``; scoring once per criterion instead of once per
                 (criterion, sparsity) gives the same plans in half the scoring time.
    allocation   global, ``--gammas 3.0`` (several: one row each), ``--round-to 8``, ``--granularities group``
                 (``query_head`` too: one scoring pass gives both, a group's score being the sum of its k/v
                 part and its heads'); a setting the allocation refuses (one KV group per layer cannot lose
                 whole groups) is a row saying why.
    probe        the held-out documents, tokenised the same way, packed into
                 ``--eval-seq-len 128``-token windows, first ``--eval-windows 64`` windows,
                 batches of ``--eval-batch-size 8`` dicts {"input_ids", "labels"}.
    perplexity   ``nirvana_lightning.eval.compute_perplexity`` (next-token NLL over T-1 positions
                 per window), dense and under ``masked_units(model, plan)``.
    KL           mean over every probe token (all T positions) of KL(P_dense || Q_pruned) over the
                 vocabulary, in fp32 (``pruning.probe.mean_token_kl``, the function KL selection uses;
                 the dense log-probs are computed once by ``compute_dense_logprobs``).
    params       block linear weights kept (``plan.block_params_after``) and total parameters
                 after = total - (block before - block after); embeddings, norms and the head stay.

A sanity check (``--no-sanity-check`` skips it) slices a float64 deep copy of the model with the first
criterion's plan at the largest sparsity and compares its logits and parameter count with the
masked copy's.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time

import torch
from torch import nn

from nirvana_lightning import compute_unit_scores, count_parameters, cut, load_model, masked_units
from nirvana_lightning.data import (
    leading_bos,
    pack_documents,
    read_records,
    sample_windows,
    split_documents,
    start_with_bos,
)
from nirvana_lightning.errors import ConfigError
from nirvana_lightning.eval import compute_perplexity
from nirvana_lightning.families.base import GRANULARITIES
from nirvana_lightning.pruning import CRITERIA, PruningPlan, plan_from_scores
from nirvana_lightning.pruning.gradients import fingerprint
from nirvana_lightning.pruning.selection import compute_dense_logprobs, mean_token_kl

START = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[quality {time.perf_counter() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


def build_data(tokenizer, args: argparse.Namespace) -> tuple[torch.Tensor, list[dict], dict]:
    """Calibration windows ``(N, T)`` from the train documents and probe batches from the held-out ones."""
    docs = read_records("brown")
    train_idx, val_idx = split_documents(len(docs), args.val_fraction, seed=args.split_seed)
    ids = tokenizer([d["text"] for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream = torch.tensor([t for i in train_idx for t in (*ids[i], eos)], dtype=torch.long)
    bos = leading_bos(tokenizer)  # Gemma: every window starts with BOS, as the model was trained (SmolLM2: none)
    calibration = start_with_bos(sample_windows(stream, args.n_calibration, args.calibration_seq_len, args.seed), bos)
    probe = start_with_bos(pack_documents([ids[i] for i in val_idx], args.eval_seq_len, eos), bos)
    n_available = probe.shape[0]
    probe = probe[: args.eval_windows]
    batches = [{"input_ids": w, "labels": w.clone()} for w in probe.split(args.eval_batch_size)]
    info = {"n_doc": len(docs), "n_train_doc": len(train_idx), "n_val_doc": len(val_idx),
            "n_train_token": stream.numel(), "n_probe_available": n_available, "n_probe": probe.shape[0]}
    return calibration, batches, info


def check_masked_equals_sliced(model: nn.Module, plan: PruningPlan, batch: dict, total_after: int) -> str:
    """Slice a float64 copy by ``plan``; compare its logits with the masked copy's and its parameter count with
    the plan's (float64: in float32 a deep model's summation order alone moves logits by ~1e-4 of their scale;
    transformers' RMSNorm still computes in float32 inside a float64 model, hence a 1e-6 relative bound)."""
    with torch.no_grad():
        pruned = copy.deepcopy(model).double()
        with masked_units(pruned, plan):
            masked = pruned(input_ids=batch["input_ids"]).logits
        cut(pruned, plan)
        sliced = pruned(input_ids=batch["input_ids"]).logits
    n_after = count_parameters(pruned)["total"]
    del pruned
    diff = float((masked - sliced).abs().max())
    scale = float(masked.abs().max())
    ok = diff <= 1e-6 * scale and n_after == total_after
    return (f"sanity check ({plan.provenance['criterion']}, s={plan.provenance['sparsity']}, "
            f"{plan.granularity}): masked vs sliced float64 logits max |diff| {diff:.2e} (max |logit| {scale:.1f}); "
            f"sliced model has {n_after:,} params, expected {total_after:,}: {'OK' if ok else 'MISMATCH'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model source for load_model")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5], help="block-weight sparsities")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA), help="saliency criteria")
    parser.add_argument("--gammas", type=float, nargs="+", default=[3.0],
                        help="MLP-to-attention pruning-fraction ratios")
    parser.add_argument("--granularities", nargs="+", choices=GRANULARITIES, default=["group"],
                        help="attention granularities (query_head: single query heads too)")
    parser.add_argument("--round-to", type=int, default=8, help="kept MLP width per layer rounded up to this multiple")
    parser.add_argument("--n-calibration", type=int, default=32, help="calibration windows")
    parser.add_argument("--calibration-seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of 'random'")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents held out")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the document split")
    parser.add_argument("--eval-seq-len", type=int, default=128, help="tokens per probe window")
    parser.add_argument("--eval-windows", type=int, default=64, help="at most this many probe windows")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="probe windows per forward pass")
    parser.add_argument("--no-sanity-check", action="store_true", help="skip the masked-vs-sliced check")
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    command = f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {command}"

    model, tokenizer = load_model(args.model)
    calibration, batches, info = build_data(tokenizer, args)
    counts = count_parameters(model)
    log(f"data: {info}; calibration {tuple(calibration.shape)} fingerprint {fingerprint([calibration])}")

    probe = torch.cat([b["input_ids"] for b in batches])
    with torch.no_grad():
        dense_logprobs = compute_dense_logprobs(model, probe, args.eval_batch_size)
    ppl_dense = compute_perplexity(model, batches)
    log(f"dense perplexity {ppl_dense:.3f}")

    rows, plans = [], []
    scored_granularity = "query_head" if "query_head" in args.granularities else "group"
    for criterion in args.criteria:
        start = time.perf_counter()
        # one pass per criterion: group scores are the sums of the query-head pass's parts (random aside)
        scores = compute_unit_scores(model, calibration, criterion=criterion, seed=args.seed,
                                     granularity=scored_granularity)
        seconds = time.perf_counter() - start
        log(f"{criterion}: scored in {seconds:.0f} s")
        provenance = {"criterion": criterion, "calibration_fingerprint": fingerprint([calibration]),
                      "calibration_shape": list(calibration.shape), "seed": args.seed,
                      "scoring_seconds": round(seconds, 3)}
        for granularity in args.granularities:
            by_granularity = scores if granularity == scored_granularity else (
                compute_unit_scores(model, calibration, criterion=criterion, seed=args.seed)
                if criterion == "random" else scores.as_groups())
            for gamma in args.gammas:
                for sparsity in args.sparsities:
                    setting = {"criterion": criterion, "granularity": granularity, "gamma": gamma,
                               "sparsity": sparsity}
                    try:
                        plan = plan_from_scores(model, by_granularity, sparsity=sparsity, gamma=gamma,
                                                round_to=args.round_to, attention_granularity=granularity,
                                                provenance=provenance)
                    except ConfigError as err:  # e.g. one KV group per layer: whole groups cannot go
                        rows.append({**setting, "refused": str(err).splitlines()[0]})
                        log(f"{setting}: refused: {err}")
                        continue
                    with masked_units(model, plan):
                        ppl = compute_perplexity(model, batches)
                        kl, _ = mean_token_kl(model, probe, dense_logprobs, args.eval_batch_size)
                    removed = plan.block_params_before - plan.block_params_after
                    rows.append({**setting, "plan": plan, "ppl": ppl, "kl": kl,
                                 "total_after": counts["total"] - removed})
                    plans.append(plan)
                    log(f"{setting}: perplexity {ppl:.3f}, KL {kl:.4f}")

    sanity = None
    if not args.no_sanity_check and rows:
        first = max((r for r in rows if r["criterion"] == args.criteria[0] and "plan" in r),
                    key=lambda r: (r["granularity"] == "query_head", r["sparsity"]))
        sanity = check_masked_equals_sliced(model, first["plan"], batches[0], first["total_after"])
        log(sanity)

    n_attn = sum(plans[0].n_kv_group_before) if plans else 0
    n_mlp = sum(plans[0].mlp_dim_before) if plans else 0
    n_token = sum(b["input_ids"].numel() for b in batches)
    n_prediction = sum(b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1) for b in batches)
    n_head = sum(plans[0].n_head_before) if plans else 0
    print(f"\n## Pruning quality: {args.model}, round_to {args.round_to}, calibration "
          f"{args.n_calibration} x {args.calibration_seq_len} (seed {args.seed}, train side of a "
          f"{1 - args.val_fraction:.0%}/{args.val_fraction:.0%} document split of Brown: {info['n_train_doc']} train / "
          f"{info['n_val_doc']} held-out documents), probe {info['n_probe']} x {args.eval_seq_len} held-out tokens "
          f"({info['n_probe_available']} windows available)\n")
    print("| criterion | granularity | gamma | sparsity | realised block sparsity | KV groups kept | query heads kept "
          "| MLP neurons kept | block params kept | total params after | perplexity | KL(dense ‖ pruned) / token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| dense | | | 0 | 0 | {n_attn}/{n_attn} | {n_head}/{n_head} | {n_mlp:,}/{n_mlp:,} | "
          f"{counts['block']:,} (100.0%) | {counts['total']:,} | {ppl_dense:.3f} | 0 |")
    for r in rows:
        head = f"| {r['criterion']} | {r['granularity']} | {r['gamma']:g} | {r['sparsity']:g} |"
        if "refused" in r:
            print(f"{head} refused: {r['refused']} | | | | | | | |")
            continue
        plan = r["plan"]
        kept = plan.block_params_after / plan.block_params_before
        ppl = f"{r['ppl']:,.3f}" if math.isfinite(r["ppl"]) else "inf"
        print(f"{head} {plan.realised_sparsity:.4f} | {sum(plan.n_kv_group_after)}/{n_attn} | "
              f"{sum(plan.n_head_after)}/{n_head} | {sum(plan.mlp_dim_after):,}/{n_mlp:,} | "
              f"{plan.block_params_after:,} ({kept:.1%}) | {r['total_after']:,} ({r['total_after'] / counts['total']:.1%}) "
              f"| {ppl} | {r['kl']:.4f} |")
    print(f"\nperplexity over {n_prediction:,} next-token predictions; KL over {n_token:,} token positions; total params {counts['total']:,} "
          f"(block linear {counts['block']:,}, other {counts['other']:,})")
    if sanity:
        print(sanity)
    print(f"command: {command}")
    print(f"total wall time {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
