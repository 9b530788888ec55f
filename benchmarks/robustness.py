"""Cross-domain robustness of pruning criteria on SmolLM2: calibrate on one Brown genre group, evaluate on all.

Purpose: NIRVANA's claim is task-agnostic robustness, which a single-domain probe does not test. Each
criterion (nirvana, taylor, wanda_sp, flap, magnitude, random) is calibrated on one genre group of the
shipped Brown corpus and evaluated (perplexity and KL to the dense model) on every group, at two
sparsities and with gamma 3 and gamma 'auto'; then the zero-shot cloze accuracy (the shipped lm-eval
task) and the perplexity after a short LoRA recovery, per criterion.

Command (from the repository root; about 40 min on 2 CPU cores at the defaults):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/robustness.py --out docs/robustness.json

Smoke test (tiny random Llama, seconds; the numbers mean nothing):

    .venv/bin/python benchmarks/robustness.py --source tiny-llama --recovery-steps 2 --cloze-limit 4 --out /tmp/r.json

Protocol.
    groups       Brown genres (the ``category`` field) in three groups: press (news, editorial, reviews),
                 fiction (adventure, fiction, mystery, romance, humor, science_fiction), learned (learned,
                 government, hobbies, religion, lore, belles_lettres). The 13 documents the cloze task is
                 built from are left out. Each group's documents are split (seeded) into calibration, probe
                 and evaluation documents: no text is shared.
    calibration  ``--n-calibration`` x 128-token windows sampled from a group's calibration documents.
    scoring      ``compute_unit_scores`` once per (criterion, calibration group); every sparsity and gamma
                 is allocated from the same scores (``plan_from_scores``, global, round_to 8).
    gamma        ``--gamma`` (3) for every criterion, also ``--nirvana-gammas`` (1) for nirvana, and 'auto':
                 ``search_gamma`` on the calibration group's probe windows (``--n-probe``), default grid
                 (its probe KL curve is stored with each cell).
    evaluation   each group's first ``--n-eval`` 128-token evaluation windows, under ``masked_units``
                 (exactly the pruned model's function, no copy): perplexity, and mean per-token
                 KL(P_dense || Q_pruned) against the dense log-probs computed once.
    off-domain   the cells whose evaluation group differs from the calibration group.
    cloze        lm-eval ``nirvana_brown_cloze`` (0-shot, ``--cloze-limit`` examples) under masking, for
                 each criterion at both sparsities, gamma 3, calibrated on ``--cloze-group``.
    recovery     for each criterion at ``--recovery-sparsity`` (gamma 3, calibrated on ``--cloze-group``):
                 a copy is cut, LoRA (r 8, alpha 16, dropout 0.05, all seven roles) trained for
                 ``--recovery-steps`` AdamW steps (lr 1e-3, 5 warmup steps then cosine to 0.1 x lr, batches
                 of 4 windows of 128 tokens from every group's calibration documents, the same batches for
                 every criterion), then merged and evaluated on every group.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from nirvana_lightning import compute_unit_scores, load_model, masked_units
from nirvana_lightning.data import pack_documents, read_records, sample_windows
from nirvana_lightning.divergence import summed_kl
from nirvana_lightning.pruning import plan_from_scores
from nirvana_lightning.pruning.api import cut
from nirvana_lightning.pruning.gamma import GAMMA_GRID, search_gamma

GROUPS = {
    "press": ("news", "editorial", "reviews"),
    "fiction": ("adventure", "fiction", "mystery", "romance", "humor", "science_fiction"),
    "learned": ("learned", "government", "hobbies", "religion", "lore", "belles_lettres"),
}
CRITERIA = ("nirvana", "taylor", "wanda_sp", "flap", "magnitude", "random")
CLOZE_TASK = Path(__file__).resolve().parents[1] / "nirvana_lightning" / "eval" / "tasks" / "nirvana_brown_cloze_test.jsonl"
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[robustness {time.perf_counter() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


def build_groups(tokenizer, args) -> dict[str, dict[str, torch.Tensor]]:
    """Per group: calibration stream, probe windows, evaluation windows (disjoint documents)."""
    cloze_docs = {json.loads(line)["doc_id"] for line in CLOZE_TASK.read_text().splitlines() if line.strip()}
    docs = [d for d in read_records("brown") if d["id"] not in cloze_docs]  # the cloze test's documents stay unseen
    eos = tokenizer.eos_token_id
    out = {}
    for name, genres in GROUPS.items():
        members = [d for d in docs if d["category"] in genres]
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(args.seed)).tolist()
        members = [members[i] for i in order]
        ids = tokenizer([d["text"] for d in members], add_special_tokens=False, verbose=False)["input_ids"]
        n = len(ids)
        calib_docs, probe_docs, eval_docs = ids[: n // 2], ids[n // 2: n // 2 + max(1, n // 8)], ids[n // 2 + max(1, n // 8):]
        stream = torch.tensor([t for d in calib_docs for t in (*d, eos)], dtype=torch.long)
        out[name] = {
            "stream": stream,
            "calibration": sample_windows(stream, args.n_calibration, args.seq_len, args.seed),
            "probe": pack_documents(probe_docs, args.seq_len, eos)[: args.n_probe],
            "eval": pack_documents(eval_docs, args.seq_len, eos)[: args.n_eval],
            "documents": {"calibration": len(calib_docs), "probe": len(probe_docs), "eval": len(eval_docs)},
        }
    return out


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, dense: list[torch.Tensor] | None, batch: int = 8):
    """(perplexity, mean per-token KL to the dense log-probs, and the log-probs when ``dense`` is None)."""
    nll, n_nll, kl, n_kl, logprobs = 0.0, 0, 0.0, 0, []
    for k, ids in enumerate(windows.split(batch)):
        logits = model(input_ids=ids).logits.float()
        log_q = torch.log_softmax(logits, dim=-1)
        nll -= float(log_q[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        n_nll += ids[:, 1:].numel()
        if dense is None:
            logprobs.append(log_q)
        else:
            kl += float(summed_kl(dense[k], logits, reference_is_logprobs=True))
            n_kl += log_q.shape[0] * log_q.shape[1]
    return math.exp(nll / n_nll), (kl / n_kl if dense is not None else 0.0), logprobs


def recover(model: nn.Module, plan, batches: list[torch.Tensor], steps: int, lr: float = 1e-3) -> nn.Module:
    """A cut copy, LoRA-trained for ``steps`` AdamW steps, merged."""
    from nirvana_lightning.recovery import apply_recovery

    pruned = copy.deepcopy(model)
    cut(pruned, plan)
    torch.manual_seed(0)  # the same LoRA initialisation (of the shapes this plan leaves) and dropout stream
    peft_model = apply_recovery(pruned, "lora", lora_r=8, lora_alpha=16, lora_dropout=0.05)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(5, steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    peft_model.train()
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def render(result: dict) -> str:
    """The markdown page (docs/robustness.md) from the JSON the run wrote: every figure comes from it."""
    a = result["args"]
    cells = result["cells"]
    lines = [f"# Cross-domain robustness of the pruning criteria ({a['source']})", "",
             "Written by `benchmarks/robustness.py` (protocol in its docstring) from `robustness.json`:", "",
             "```bash", "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/robustness.py --out docs/robustness.json",
             ".venv/bin/python benchmarks/robustness.py --render docs/robustness.json > docs/robustness.md", "```", "",
             f"Run time {result['seconds'] / 60:.1f} min on {result.get('cpu_threads', '?')} CPU threads. Calibration {a['n_calibration']} x "
             f"{a['seq_len']} tokens, evaluation {a['n_eval']} x {a['seq_len']} tokens per group, probe "
             f"{a['n_probe']} windows (gamma auto).", "",
             "| group | genres | documents (calibration / probe / evaluation) | dense perplexity |", "|---|---|---|---|"]
    for g, genres in result["groups"].items():
        d = result["documents"][g]
        lines.append(f"| {g} | {', '.join(genres)} | {d['calibration']} / {d['probe']} / {d['eval']} | "
                     f"{result['dense_ppl'][g]:.2f} |")
    for sparsity in a["sparsities"]:
        lines += ["", f"## Sparsity {sparsity:g}", "",
                  "Mean over calibration groups; off-domain = evaluated on a group other than the calibration one; "
                  "worst = the worst off-domain cell (calibration -> evaluation).", "",
                  "| criterion | gamma | in-domain KL | off-domain KL | worst off-domain KL | in-domain ppl | "
                  "off-domain ppl | worst off-domain ppl |", "|---|---|---|---|---|---|---|---|"]
        keys = sorted({(c["criterion"], c["gamma"]) for c in cells if c["sparsity"] == sparsity},
                      key=lambda k: (a["criteria"].index(k[0]), k[1]))
        rows = []
        for crit, gamma in keys:
            sel = [c for c in cells if c["sparsity"] == sparsity and c["criterion"] == crit and c["gamma"] == gamma]
            on = [c for c in sel if c["calibration"] == c["evaluation"]]
            off = [c for c in sel if c["calibration"] != c["evaluation"]]
            worst_kl = max(off, key=lambda c: c["kl"])
            worst_ppl = max(off, key=lambda c: c["ppl"])
            rows.append((_mean([c["kl"] for c in off]), crit, gamma))
            on_kl = f"{_mean([c['kl'] for c in on]):.4f}" if on else "-"
            on_ppl = f"{_mean([c['ppl'] for c in on]):.2f}" if on else "-"
            lines.append(f"| {crit} | {gamma} | {on_kl} | {_mean([c['kl'] for c in off]):.4f} | "
                         f"{worst_kl['kl']:.4f} ({worst_kl['calibration']} -> {worst_kl['evaluation']}) | "
                         f"{on_ppl} | {_mean([c['ppl'] for c in off]):.2f} | "
                         f"{worst_ppl['ppl']:.2f} ({worst_ppl['calibration']} -> {worst_ppl['evaluation']}) |")
        best = min(rows)
        lines += ["", f"Lowest off-domain KL at {sparsity:g}: {best[1]} (gamma {best[2]}).", ""]
        lines += [f"Full matrix at sparsity {sparsity:g}, gamma {a['gamma']:g}: KL to dense (perplexity), rows "
                  "calibration group, columns evaluation group.", ""]
        groups = list(result["groups"])
        for crit in a["criteria"]:
            lines += [f"**{crit}**", "", "| calibration \\ evaluation | " + " | ".join(groups) + " |",
                      "|---|" + "---|" * len(groups)]
            for cal in a["calibration_groups"]:
                row = []
                for ev in groups:
                    c = next((c for c in cells if c["sparsity"] == sparsity and c["criterion"] == crit
                              and c["gamma"] == f"{a['gamma']}" and c["calibration"] == cal and c["evaluation"] == ev),
                             None)
                    row.append("-" if c is None else f"{c['kl']:.4f} ({c['ppl']:.1f})")
                lines.append(f"| {cal} | " + " | ".join(row) + " |")
            lines.append("")
    autos = [c for c in cells if c["criterion"] == "nirvana" and c["gamma"] == "auto" and c["gamma_curve"]]
    if autos:
        lines += ["## gamma: 1 vs 3 vs auto (nirvana)", "",
                  "Probe KL: on the calibration group's probe (held-out documents of the same group), from the "
                  "auto search's curve: auto is the lowest there by construction (the probe chose it); the "
                  "off-domain columns (mean over the other groups) are what it does off the probe.", "",
                  "| sparsity | calibration | probe KL at 1 | at 3 | auto (gamma chosen) | off-domain KL 1 / 3 / auto | "
                  "off-domain ppl 1 / 3 / auto |", "|---|---|---|---|---|---|---|"]
        for sparsity in a["sparsities"]:
            for cal in a["calibration_groups"]:
                auto = next(c for c in autos if c["sparsity"] == sparsity and c["calibration"] == cal)
                curve = dict(zip(auto["gamma_curve"]["gammas"], auto["gamma_curve"]["kls"]))
                off = {g: [c for c in cells if c["criterion"] == "nirvana" and c["sparsity"] == sparsity
                           and c["calibration"] == cal and c["evaluation"] != cal and c["gamma"] == g]
                       for g in ("1.0", "3.0", "auto")}
                fmt = lambda v: "infeasible" if v is None else f"{v:.4f}"  # noqa: E731
                lines.append(f"| {sparsity:g} | {cal} | {fmt(curve.get(1.0))} | {fmt(curve.get(3.0))} | "
                             f"{fmt(auto['gamma_curve']['kls'][auto['gamma_curve']['best_index']])} "
                             f"({auto['gamma_used']:g}) | "
                             + " / ".join(f"{_mean([c['kl'] for c in off[g]]):.4f}" if off[g] else "-" for g in off)
                             + " | " + " / ".join(f"{_mean([c['ppl'] for c in off[g]]):.2f}" if off[g] else "-"
                                                  for g in off) + " |")
        lines.append("")
    if result["cloze"]:
        lines += ["## Zero-shot cloze accuracy", "",
                  f"lm-eval `nirvana_brown_cloze`, 0-shot, first {a['cloze_limit']} examples (one standard error of "
                  f"an accuracy near 0.5 is about {0.5 / math.sqrt(max(1, a['cloze_limit'])):.2f}), calibration group "
                  f"{a['cloze_group']}, gamma {a['gamma']:g}; the task's documents are excluded from every split.", "",
                  "| criterion | " + " | ".join(f"s = {s:g}" for s in a["sparsities"]) + " |",
                  "|---|" + "---|" * len(a["sparsities"])]
        dense = next(c for c in result["cloze"] if c["criterion"] == "dense")
        lines.append("| dense | " + " | ".join(f"{dense['acc']:.3f}" for _ in a["sparsities"]) + " |")
        for crit in a["criteria"]:
            accs = [next(c["acc"] for c in result["cloze"] if c["criterion"] == crit and c["sparsity"] == s)
                    for s in a["sparsities"]]
            lines.append(f"| {crit} | " + " | ".join(f"{x:.3f}" for x in accs) + " |")
        lines.append("")
    if result["recovery"]:
        groups = list(result["groups"])
        lines += ["## Recovery per criterion", "",
                  f"Sparsity {a['recovery_sparsity']:g}, gamma {a['gamma']:g}, calibration group {a['cloze_group']}; "
                  f"{a['recovery_steps']} LoRA steps (recipe in the docstring), the same batches for every criterion. "
                  "Perplexity pruned -> recovered per evaluation group.", "",
                  "| criterion | " + " | ".join(groups) + " | mean recovered |", "|---|" + "---|" * (len(groups) + 1)]
        for row in result["recovery"]:
            lines.append(f"| {row['criterion']} | " + " | ".join(
                f"{row[f'pruned_ppl_{g}']:.1f} -> {row[f'recovered_ppl_{g}']:.1f}" for g in groups)
                + f" | {_mean([row[f'recovered_ppl_{g}'] for g in groups]):.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--calibration-groups", nargs="+", default=list(GROUPS))
    parser.add_argument("--n-calibration", type=int, default=16)
    parser.add_argument("--n-probe", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--no-auto", action="store_true", help="skip gamma 'auto'")
    parser.add_argument("--auto-criteria", nargs="*", default=list(CRITERIA),
                        help="criteria that also run gamma 'auto' (default all)")
    parser.add_argument("--off-domain-only", action="store_true", help="skip the in-domain (diagonal) cells")
    parser.add_argument("--nirvana-gammas", nargs="*", type=float, default=[1.0],
                        help="more fixed gammas for the nirvana criterion (the gamma comparison)")
    parser.add_argument("--cloze-group", default="learned")
    parser.add_argument("--cloze-limit", type=int, default=100)
    parser.add_argument("--recovery-sparsity", type=float, default=0.5)
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--render", metavar="JSON", help="print the markdown page of a finished run and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())), end="")
        return
    if not args.out:
        parser.error("--out is required")
    torch.manual_seed(args.seed)

    model, tokenizer = load_model(args.source)
    model.eval()
    groups = build_groups(tokenizer, args)
    log("groups: " + ", ".join(f"{g}: {v['documents']} docs, {v['eval'].shape[0]} eval windows" for g, v in groups.items()))
    dense = {}
    for name, g in groups.items():
        ppl, _, logprobs = evaluate(model, g["eval"], None)
        dense[name] = {"ppl": ppl, "logprobs": logprobs}
    log("dense perplexity: " + ", ".join(f"{g} {d['ppl']:.2f}" for g, d in dense.items()))
    gammas = [args.gamma] + ([] if args.no_auto else ["auto"])
    extra_gammas = [g for g in args.nirvana_gammas if g != args.gamma]  # nirvana: also these fixed values
    cells, plans = [], {}
    for cal in args.calibration_groups:
        for criterion in args.criteria:
            start = time.perf_counter()
            scores = compute_unit_scores(model, groups[cal]["calibration"], criterion=criterion, seed=args.seed)
            score_s = time.perf_counter() - start
            for sparsity in args.sparsities:
                wanted = [g for g in gammas if g != "auto" or criterion in args.auto_criteria]
                for gamma in (extra_gammas + wanted if criterion == "nirvana" else wanted):
                    def plan_for(g, _s=sparsity, _c=criterion):
                        return plan_from_scores(model, scores, sparsity=_s, gamma=g,
                                                provenance={"criterion": _c, "calibration_group": cal})
                    curve = None
                    if gamma == "auto":
                        plan, search = search_gamma(model, plan_for, groups[cal]["probe"], GAMMA_GRID)
                        chosen, curve = search.gamma, search.to_dict()
                    else:
                        plan, chosen = plan_for(gamma), gamma
                    plans[(cal, criterion, sparsity, str(gamma))] = plan
                    for ev, g in groups.items():
                        if args.off_domain_only and ev == cal:
                            continue
                        with masked_units(model, plan):
                            ppl, kl, _ = evaluate(model, g["eval"], dense[ev]["logprobs"])
                        cells.append({"calibration": cal, "evaluation": ev, "criterion": criterion,
                                      "sparsity": sparsity, "gamma": str(gamma), "gamma_used": chosen,
                                      "ppl": ppl, "kl": kl, "realised_sparsity": plan.realised_sparsity,
                                      "scoring_s": round(score_s, 1), "gamma_curve": curve})
                    off = [c for c in cells[-len(groups):] if c["evaluation"] != cal and c["calibration"] == cal
                           and c["criterion"] == criterion and c["gamma"] == str(gamma)]
                    log(f"{cal:8s} {criterion:9s} s={sparsity} gamma={gamma} (used {chosen:g}): off-domain mean "
                        f"ppl {sum(c['ppl'] for c in off) / len(off):.2f}, KL {sum(c['kl'] for c in off) / len(off):.4f}")
    cloze = []
    if args.cloze_limit > 0:
        from nirvana_lightning.eval.lm_eval import run_lm_eval

        def accuracy(m) -> float:
            res = run_lm_eval(m, tokenizer, ["nirvana_brown_cloze"], limit=args.cloze_limit, batch_size=8)
            return float(res["nirvana_brown_cloze"]["acc"])

        cloze.append({"criterion": "dense", "sparsity": 0.0, "acc": accuracy(model)})
        for criterion in args.criteria:
            for sparsity in args.sparsities:
                plan = plans[(args.cloze_group, criterion, sparsity, str(args.gamma))]
                with masked_units(model, plan):
                    cloze.append({"criterion": criterion, "sparsity": sparsity, "acc": accuracy(model)})
                log(f"cloze {criterion} s={sparsity}: {cloze[-1]['acc']:.3f}")
    recovery = []
    if args.recovery_steps > 0:
        stream = torch.cat([g["stream"] for g in groups.values()])
        windows = sample_windows(stream, 4 * args.recovery_steps, args.seq_len, args.seed + 1)
        batches = list(windows.split(4))
        for criterion in args.criteria:
            plan = plans[(args.cloze_group, criterion, args.recovery_sparsity, str(args.gamma))]
            start = time.perf_counter()
            recovered = recover(model, plan, batches, args.recovery_steps)
            row = {"criterion": criterion, "sparsity": args.recovery_sparsity, "steps": args.recovery_steps,
                   "seconds": round(time.perf_counter() - start, 1)}
            for ev, g in groups.items():
                with masked_units(model, plan):
                    row[f"pruned_ppl_{ev}"] = evaluate(model, g["eval"], dense[ev]["logprobs"])[0]
                row[f"recovered_ppl_{ev}"] = evaluate(recovered, g["eval"], dense[ev]["logprobs"])[0]
            recovery.append(row)
            del recovered
            log(f"recovery {criterion}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if "ppl" in k))
    result = {"args": vars(args), "groups": {k: list(v) for k, v in GROUPS.items()},
              "documents": {g: v["documents"] for g, v in groups.items()},
              "dense_ppl": {g: d["ppl"] for g, d in dense.items()}, "cells": cells, "cloze": cloze,
              "cpu_threads": torch.get_num_threads(),
              "recovery": recovery, "seconds": round(time.perf_counter() - START, 1)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
