"""KL-divergence calibration selection on SmolLM2: does the lowest-KL candidate give the best model?

For K candidate calibration sets (seeded random 32 x 128 windows of the training-side Brown
text), each candidate is scored and allocated at the given sparsity; its pruned model is
evaluated by masking (no copy). Printed per candidate: mean token KL(dense || pruned) on the
probe (128 x 64 tokens of held-out documents) and perplexity on a separate evaluation set of
other held-out documents. Then: Spearman correlation between KL and perplexity, the selected
candidate's perplexity vs the median candidate's, and wall time per candidate vs one plain
scoring pass (make_plan alone) measured in the same run.

Documents are split three ways (seeded): calibration side, probe documents, evaluation documents.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/calibration_selection.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nirvana_lightning import load_model, make_plan, masked_units, select_calibration
from nirvana_lightning.data import pack_documents, read_records, sample_windows, split_documents
from nirvana_lightning.eval import compute_perplexity


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks on ties)."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--n-calibration", type=int, default=32)
    parser.add_argument("--calibration-seq-len", type=int, default=128)
    parser.add_argument("--probe", type=int, nargs=2, default=[128, 64], metavar=("N", "T"))
    parser.add_argument("--eval-windows", type=int, default=32, help="128-token windows of evaluation text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tok = load_model(args.model)
    docs = read_records("brown")
    train_idx, held = split_documents(len(docs), 0.2, seed=args.seed)
    probe_idx, eval_idx = held[: len(held) // 2], held[len(held) // 2:]

    def stream(idx):
        ids = tok([docs[i]["text"] for i in idx], add_special_tokens=False)["input_ids"]
        return torch.tensor([t for d in ids for t in (*d, tok.eos_token_id)])

    train = stream(train_idx)
    candidates = [sample_windows(train, args.n_calibration, args.calibration_seq_len, args.seed + i)
                  for i in range(args.candidates)]
    probe = sample_windows(stream(probe_idx), *args.probe, seed=args.seed)
    eval_ids = tok([docs[i]["text"] for i in eval_idx], add_special_tokens=False)["input_ids"]
    windows = pack_documents(eval_ids, 128, tok.eos_token_id)[: args.eval_windows]
    eval_batches = [{"input_ids": w, "labels": w} for w in windows.split(8)]

    start = time.perf_counter()
    make_plan(model, candidates[0], sparsity=args.sparsity, gamma=args.gamma)
    plain = time.perf_counter() - start

    start = time.perf_counter()
    result = select_calibration(model, candidates, probe, sparsity=args.sparsity, gamma=args.gamma)
    total = time.perf_counter() - start
    ppls = []
    for plan in result.plans:
        with masked_units(model, plan):
            ppls.append(compute_perplexity(model, eval_batches))
    dense_ppl = compute_perplexity(model, eval_batches)

    print(f"\n## KL calibration selection: {args.model}, sparsity {args.sparsity}, gamma {args.gamma}, "
          f"{args.candidates} candidates of {args.n_calibration} x {args.calibration_seq_len}, probe "
          f"{args.probe[0]} x {args.probe[1]} (held-out documents), evaluation {len(windows)} x 128 (other held-out "
          "documents)\n")
    print("| candidate | KL(dense ‖ pruned) / token | probe perplexity | evaluation perplexity | seconds |")
    print("|---|---|---|---|---|")
    for i, kl in enumerate(result.kls):
        mark = " (selected)" if i == result.best_index else ""
        print(f"| {i}{mark} | {kl:.5f} | {result.perplexities[i]:.2f} | {ppls[i]:.2f} | {result.seconds[i]:.1f} |")
    median = statistics.median(ppls)
    print(f"\ndense evaluation perplexity: {dense_ppl:.2f}")
    print(f"Spearman(KL, evaluation perplexity) = {spearman(result.kls, ppls):.3f}")
    print(f"selected candidate's evaluation perplexity {ppls[result.best_index]:.2f} vs median {median:.2f} "
          f"(best {min(ppls):.2f}, worst {max(ppls):.2f})")
    print(f"wall time: {total / args.candidates:.1f} s per candidate (score + allocate + masked probe evaluation) vs "
          f"{plain:.1f} s for one plain scoring pass; ratio {total / args.candidates / plain:.2f}; "
          f"dense probe log-probs computed once")


if __name__ == "__main__":
    main()
