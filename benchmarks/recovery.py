"""Recovery recipes after NIRVANA pruning on SmolLM2: one-shot vs iterative, KD vs LM loss, LoRA vs full.

Purpose: at one sparsity (default 50% of block weights, gamma 3), compare how much validation
perplexity five recovery recipes give back, all with the SAME number of optimizer steps, the same
training windows in the same order, the same seed and the same evaluation. Every recipe is a real
Lightning fit (``L.Trainer`` + ``NirvanaModule`` + ``NirvanaDataModule`` + ``PerplexityCallback`` +
``NirvanaPruningCallback``), as ``python -m nirvana_lightning fit`` would run it.

Command (from the repository root; ~30 min on 2 CPU cores at the defaults):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/recovery.py

On a machine shared with other jobs, add ``--threads 1``: two torch threads competing with another
process for two cores run several times slower than one.

Smoke test (seconds, tiny random Llama; the numbers mean nothing):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/recovery.py --source tiny-llama --steps 3

Runs (``--runs`` picks a subset by name).
    oneshot-lora-lm   schedule once, LoRA (r 8, alpha 16, dropout 0.05, all seven roles), LM loss, lr --lora-lr 1e-3
    iter-lora-lm      schedule --iterative-schedule linear, n_steps 3, every_n_steps = round(steps / 3): cuts at
                      setup, at step k and at step 2k (to 1/3, 2/3 and all of the target sparsity on the
                      linear curve), so the last cut leaves steps - 2k recovery steps; LoRA, LM loss. Each
                      cut re-scores the partly recovered model on fresh calibration windows (seed + step).
    oneshot-lora-kd   schedule once, LoRA, KD loss from the dense model (--kd-alpha 1.0: pure logit
                      distillation, --kd-temperature 1.0)
    oneshot-full-lm   schedule once, full fine-tuning of every parameter, LM loss, lr --full-lr 1e-4
    oneshot-full-kd   schedule once, full fine-tuning, KD loss (same alpha / temperature)

Protocol.
    data         the shipped Brown corpus as in configs/quickstart.yaml: ``NirvanaDataModule`` (task lm,
                 seq_len 128, val_fraction 0.05, split_seed 0), batches of 4 windows in the
                 datamodule's seeded order (the same for every run), validation = the first
                 ``--val-windows 32`` held-out windows.
    pruning      ``NirvanaPruningCallback`` (criterion nirvana, functional max_over_seq, round_to 8,
                 global allocation), calibration ``--n-calibration 32`` x ``--calibration-seq-len 128``
                 windows from the train side, seed 0. The one-shot runs share one plan: the first
                 one-shot run scores it, the others apply the same plan.json through ``plan_path``
                 (same calibration seed, so scoring again would give the same plan; ``--rescore``
                 scores in every run instead). Their "pruned" perplexities are each measured, and
                 must agree.
    optimizer    AdamW (weight decay 0), 5 warmup steps then cosine to 0.1 x lr, fp32 on CPU; after an
                 iterative cut the optimizer is rebuilt (Adam state restarts, the lr continues its curve).
    perplexity   ``PerplexityCallback`` on the validation set: dense (measured once, in the first run:
                 the same model for every run), pruned (at fit start, after the setup cut; for the
                 iterative run that is after its FIRST cut only), recovered (at fit end). The
                 iterative run also measures the model right after each later cut (before its
                 recovery steps), through the ``on_nirvana_prune`` hook.
    seconds      wall seconds of the whole fit (model load, scoring, evaluations, training) and of
                 the training loop alone (between ``on_train_start`` and ``on_train_end``; includes
                 the iterative run's mid-training scoring and cuts).

One seed and few steps: differences of a few percent are within what another seed or another
sample of training windows could change.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from nirvana_lightning import (
    Calibration,
    NirvanaDataModule,
    NirvanaModule,
    NirvanaPruningCallback,
    PerplexityCallback,
    PruningTarget,
    Schedule,
    Scoring,
)
from nirvana_lightning.eval import compute_perplexity

START = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[recovery {time.perf_counter() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Recipe:
    """One recovery recipe."""

    name: str
    schedule: str  # "once" or "iterative"
    recovery: str  # "lora" or "full"
    objective: str  # "lm" or "kd"


RECIPES = (
    Recipe("oneshot-lora-lm", "once", "lora", "lm"),
    Recipe("iter-lora-lm", "iterative", "lora", "lm"),
    Recipe("oneshot-lora-kd", "once", "lora", "kd"),
    Recipe("oneshot-full-lm", "once", "full", "lm"),
    Recipe("oneshot-full-kd", "once", "full", "kd"),
)
RECIPE_NAMES = tuple(r.name for r in RECIPES)


@dataclass
class RunResult:
    recipe: Recipe
    lr: float
    ppl: dict[str, float] = field(default_factory=dict)  # stage -> validation perplexity
    cut_ppl: list[float] = field(default_factory=list)  # iterative: after each mid-training cut
    cut_steps: list[int] = field(default_factory=list)
    sparsity: float | None = None
    cut_sparsities: list[float] = field(default_factory=list)  # composed, after each cut
    n_cut: int = 0
    scoring_seconds: float = 0.0
    plan_source: str = ""
    fit_seconds: float = 0.0
    train_seconds: float = 0.0
    optimizer_steps: int = 0
    trainable_params: int = 0
    error: str | None = None


class RecoveryProbe(L.Callback):
    """Times the training loop and measures validation perplexity right after every mid-training cut."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.cut_ppl: list[float] = []
        self.cut_steps: list[int] = []
        self.trainable_params = 0
        self._start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainable_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % 10 == 0 or step == trainer.max_steps:
            loss = trainer.callback_metrics.get("train/loss")
            shown = f", train loss {float(loss):.3f}" if loss is not None else ""
            log(f"  step {step}/{trainer.max_steps}{shown} ({(time.perf_counter() - self._start) / step:.1f} s/step)")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_seconds = time.perf_counter() - self._start

    def on_nirvana_prune(self, trainer: L.Trainer, pl_module: L.LightningModule, plan) -> None:
        was_training = pl_module.training
        try:
            ppl = compute_perplexity(pl_module.model, trainer.datamodule.val_dataloader(),
                                     device=trainer.strategy.root_device)
        finally:
            pl_module.train(was_training)
        self.cut_ppl.append(ppl)
        self.cut_steps.append(trainer.global_step)
        log(f"  after the cut at step {trainer.global_step} (sparsity {plan.realised_sparsity:.3f}): "
            f"validation perplexity {ppl:.3f}")


def run_recipe(recipe: Recipe, args: argparse.Namespace, workdir: Path, measure_dense: bool,
               plan_path: str | None) -> tuple[RunResult, NirvanaPruningCallback | None]:
    """One Lightning fit; returns the results and the pruning callback (its plan)."""
    lr = args.lora_lr if recipe.recovery == "lora" else args.full_lr
    result = RunResult(recipe, lr)
    L.seed_everything(args.seed, verbose=False)
    module = NirvanaModule(
        source=args.source, dtype="float32", recovery=recipe.recovery, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
        lora_dropout=0.05, lr=lr, warmup_steps=args.warmup_steps, min_lr_ratio=0.1, objective=recipe.objective,
        kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha,
    )
    data = NirvanaDataModule(
        tokenizer=args.source, task="lm", sources=["brown"], seq_len=args.seq_len, val_fraction=0.05, split_seed=0,
        max_val_windows=args.val_windows, batch_size=args.batch_size, eval_batch_size=8,
    )
    calibration = Calibration(samples=args.n_calibration, seq_len=args.calibration_seq_len, seed=args.seed)
    prune_kwargs = dict(target=PruningTarget(sparsity=args.sparsity, gamma=args.gamma, round_to=8),
                        scoring=Scoring(criterion="nirvana", functional="max_over_seq"), calibration=calibration)
    if recipe.schedule == "iterative":
        every = max(1, round(args.steps / 3))
        pruning = NirvanaPruningCallback(**prune_kwargs, schedule=Schedule(kind=args.iterative_schedule, n_steps=3,
                                                                          every_n_steps=every))
    elif plan_path is not None:
        pruning = NirvanaPruningCallback(**prune_kwargs, plan_path=plan_path)  # the saved plan, not scored
    else:
        pruning = NirvanaPruningCallback(**prune_kwargs)
    ppl_cb = PerplexityCallback(dense=measure_dense)
    probe = RecoveryProbe()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(workdir / recipe.name),
        callbacks=[ppl_cb, pruning, probe],
    )
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data)
    except Exception:  # report and go on with the other recipes
        result.error = traceback.format_exc()
        log(f"{recipe.name} FAILED:\n{result.error}")
    result.fit_seconds = time.perf_counter() - start
    result.train_seconds = probe.train_seconds
    result.optimizer_steps = trainer.global_step
    result.trainable_params = probe.trainable_params
    result.ppl = {stage: ppl_cb.results[stage]["val"] for stage in ("dense", "pruned", "recovered")
                  if stage in ppl_cb.results}
    result.cut_ppl, result.cut_steps = probe.cut_ppl, probe.cut_steps
    if pruning.plan is not None:
        result.sparsity = pruning.plan.realised_sparsity
        result.n_cut = len(pruning.history)
        if plan_path is None:  # a reused plan carries the seconds of the run that scored it
            result.scoring_seconds = sum(p.provenance.get("scoring_seconds", 0.0) for p in pruning.history)
    result.plan_source = f"reused {Path(plan_path).name}" if plan_path is not None else "scored"
    return result, pruning


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if math.isfinite(x) else "inf"


def compare(results: dict[str, RunResult], a: str, b: str, question: str) -> str:
    """One line: final perplexity of recipe ``a`` vs ``b``."""
    ra, rb = results.get(a), results.get(b)
    pa = ra.ppl.get("recovered") if ra else None
    pb = rb.ppl.get("recovered") if rb else None
    if pa is None or pb is None:
        return f"- {question}: not available (needs {a} and {b})"
    change = (pa - pb) / pb
    word = "lower" if pa < pb else "higher"
    return (f"- {question}: {a} {pa:.2f} vs {b} {pb:.2f} final perplexity ({abs(change):.1%} {word}; "
            f"one seed, {ra.optimizer_steps} steps)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m", help="model source (tiny-llama for a smoke test)")
    parser.add_argument("--runs", nargs="+", choices=RECIPE_NAMES, default=list(RECIPE_NAMES), help="recipes to run")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every run")
    parser.add_argument("--sparsity", type=float, default=0.5, help="final block-weight sparsity")
    parser.add_argument("--gamma", type=float, default=3.0, help="MLP-to-attention pruning-fraction ratio")
    parser.add_argument("--iterative-schedule", choices=("linear", "cubic", "constant"), default="linear",
                        help="sparsity curve of the iterative run (3 cuts)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="peak lr of the LoRA runs")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="peak lr of the full fine-tuning runs")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2 r)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="linear warmup steps")
    parser.add_argument("--kd-alpha", type=float, default=1.0, help="weight of the KL term in the KD runs")
    parser.add_argument("--kd-temperature", type=float, default=1.0, help="KD softmax temperature")
    parser.add_argument("--batch-size", type=int, default=4, help="training windows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training / validation window")
    parser.add_argument("--val-windows", type=int, default=32, help="validation windows")
    parser.add_argument("--n-calibration", type=int, default=32, help="calibration windows")
    parser.add_argument("--calibration-seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything and of the calibration windows")
    parser.add_argument("--rescore", action="store_true", help="score in every one-shot run instead of reusing the plan")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 on a machine shared with other jobs)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    command = shlex.join([".venv/bin/python", "benchmarks/recovery.py", *(sys.argv[1:] if argv is None else argv)])
    command = f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {command}"
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    recipes = [r for r in RECIPES if r.name in args.runs]
    results: dict[str, RunResult] = {}
    dense: float | None = None
    plan_path: str | None = None
    with tempfile.TemporaryDirectory(prefix="nirvana-recovery-") as tmp:
        workdir = Path(tmp)
        for recipe in recipes:
            log(f"{recipe.name}: start")
            reuse = plan_path if (recipe.schedule == "once" and not args.rescore) else None
            result, pruning = run_recipe(recipe, args, workdir, measure_dense=dense is None, plan_path=reuse)
            dense = result.ppl.get("dense", dense)
            if recipe.schedule == "once" and plan_path is None and pruning.plan is not None and result.error is None:
                plan_path = str(workdir / "oneshot_plan.json")
                Path(plan_path).write_text(pruning.plan.to_json())
            results[recipe.name] = result
            log(f"{recipe.name}: done in {result.fit_seconds:.0f} s, perplexity {result.ppl}")

    n_cut_steps = max(1, round(args.steps / 3))
    print(f"\n## Recovery recipes: {args.source}, fp32 CPU ({torch.get_num_threads()} torch threads), sparsity {args.sparsity:g} (gamma {args.gamma:g}, "
          f"nirvana, round_to 8), {args.steps} optimizer steps x {args.batch_size} x {args.seq_len} tokens per run "
          f"(same windows, same order, seed {args.seed}), calibration {args.n_calibration} x "
          f"{args.calibration_seq_len}, validation {args.val_windows} x {args.seq_len} held-out Brown tokens\n")
    print("| run | schedule | recovery (lr) | loss | trainable params at train start | dense ppl | pruned ppl | recovered ppl "
          "| realised sparsity | fit s | train s | scoring s | plan |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        rec = r.recipe
        schedule = "once" if rec.schedule == "once" else f"{args.iterative_schedule}, 3 cuts every {n_cut_steps}"
        loss = "LM" if rec.objective == "lm" else f"KD (alpha {args.kd_alpha:g}, T {args.kd_temperature:g})"
        pruned = fmt(r.ppl.get("pruned"))
        if rec.schedule == "iterative" and "pruned" in r.ppl:
            pruned += " (1st cut)"
            for step, ppl in zip(r.cut_steps, r.cut_ppl):
                pruned += f"; {fmt(ppl)} (cut @ {step})"
        recovered = fmt(r.ppl.get("recovered")) if r.error is None else "FAILED"
        print(f"| {rec.name} | {schedule} | {rec.recovery} ({r.lr:g}) | {loss} | {r.trainable_params:,} | "
              f"{fmt(dense)} | {pruned} | {recovered} | {fmt(r.sparsity, 4)} | {r.fit_seconds:.0f} | "
              f"{r.train_seconds:.0f} | {r.scoring_seconds:.0f} | {r.plan_source if rec.schedule == 'once' else 'scored x' + str(r.n_cut)} |")
    print(f"\ndense perplexity measured once (first run) and shared; one-shot runs {'each score their own plan' if args.rescore else 'share one plan (scored by the first one-shot run, applied by the others through plan_path)'}.")
    if any(r.recipe.schedule == "iterative" for r in results.values()):
        print(f"iterative: {args.iterative_schedule} curve, cuts at setup (step 0), step {n_cut_steps} and step "
              f"{2 * n_cut_steps}, leaving {args.steps - 2 * n_cut_steps} recovery steps after the last cut; its 'pruned' "
              "value is after the first cut only, later values are right after each later cut.")
    print("\nQuestions (one seed, few steps: read differences of a few percent as noise):")
    print(compare(results, "iter-lora-lm", "oneshot-lora-lm", "iterative vs one-shot (LoRA, LM)"))
    print(compare(results, "oneshot-lora-kd", "oneshot-lora-lm", "KD vs LM (LoRA)"))
    print(compare(results, "oneshot-full-kd", "oneshot-full-lm", "KD vs LM (full)"))
    print(compare(results, "oneshot-full-lm", "oneshot-lora-lm", "LoRA vs full (LM): full"))
    print(compare(results, "oneshot-full-kd", "oneshot-lora-kd", "LoRA vs full (KD): full"))
    failed = [r for r in results.values() if r.error]
    for r in failed:
        print(f"\n{r.recipe.name} failed:\n```\n{r.error.rstrip()}\n```")
    total = time.perf_counter() - START
    print(f"\ncommand: {command}")
    print(f"total wall time {total:.0f} s")
    if args.out is not None:
        payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "dense_ppl": dense, "total_seconds": total,
                   "runs": [{"name": r.recipe.name, "schedule": r.recipe.schedule, "recovery": r.recipe.recovery,
                             "objective": r.recipe.objective, "lr": r.lr, "ppl": r.ppl, "cut_ppl": r.cut_ppl,
                             "cut_steps": r.cut_steps, "realised_sparsity": r.sparsity, "n_cut": r.n_cut,
                             "fit_seconds": r.fit_seconds, "train_seconds": r.train_seconds,
                             "scoring_seconds": r.scoring_seconds, "optimizer_steps": r.optimizer_steps,
                             "trainable_params": r.trainable_params, "plan": r.plan_source, "error": r.error}
                            for r in results.values()]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
