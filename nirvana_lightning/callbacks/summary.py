"""Run summary: dense -> pruned -> recovered for every metric collected, parameters and speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..contract import SummarySource, prunable
from ..errors import ConfigError, check_positive
from ..eval.speed import count_parameters_detailed, flops_per_token, measure_throughput
from ..families import get_family, unwrap_model
from ..io import write_text_atomic
from ..recovery.lora import adapter_parameter_count, without_adapter_layers
from .staged import SUMMARY_STAGES, StagedEvaluation


class RunSummaryCallback(StagedEvaluation):
    """At fit end, one table of dense / pruned / recovered for every metric of the run.

    Collects the results of every evaluation callback in the Trainer (perplexity, KL to dense,
    lm-eval, ...: any callback with a ``summary_rows()`` method returning ``{row: {stage: value}}``) and measures, itself, parameter counts, analytic FLOPs per token and
    throughput (prefill and cached decode tokens/s, :func:`~nirvana_lightning.eval.speed.measure_throughput`).
    List it BEFORE ``NirvanaPruningCallback`` so it sees the dense model. Recovered speed is
    measured with the LoRA wrapper layers taken out: the architecture of the merged, exported model.

    Writes ``summary.md`` and ``summary.json`` into the log directory and prints the table.

    Args:
        speed: measure throughput (parameters and FLOPs are always reported).
        batch_size / seq_len: prefill batch for the throughput measurement (also the FLOPs context).
        new_tokens: cached decode steps (0: no decode measurement).
        repeats / warmup: timed repetitions (median) after untimed warm-up runs. Each stage is
            measured once, at a different time of the run, so other load on the machine shows in
            the ratios; ``benchmarks/speedup.py`` alternates dense and pruned for careful figures.
    """

    prefix = "summary"
    announce = False  # the whole summary is printed at teardown instead of this callback's own stage table

    def __init__(self, speed: bool = True, batch_size: int = 1, seq_len: int = 128, new_tokens: int = 16,
                 repeats: int = 5, warmup: int = 2) -> None:
        key = "RunSummaryCallback."
        check_positive(key + "batch_size", batch_size)
        check_positive(key + "seq_len", seq_len)
        check_positive(key + "new_tokens", new_tokens, allow_zero=True)
        check_positive(key + "repeats", repeats)
        check_positive(key + "warmup", warmup, allow_zero=True)
        super().__init__(dense=True)  # the stages and their timing are StagedEvaluation's
        self.speed, self.batch_size, self.seq_len = speed, batch_size, seq_len
        self.new_tokens, self.repeats, self.warmup = new_tokens, repeats, warmup
        self.loaded: dict[str, dict] = {}  # stage -> machine load when its speed was measured (only if loaded)
        self.summary: dict | None = None

    def metric_label(self, metric: str) -> str:
        return metric

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # after every callback's on_train_end, so their "recovered" results exist
        if stage != "fit" or "recovered" not in self.results:
            return
        self.summary = self.collect(trainer, pl_module)
        table = self.render(self.summary)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank
        self._write(log_dir, table)
        rank_zero_info("run summary (" + str(log_dir / "summary.md") + "):\n" + table)

    # -------------------------------------------------------------- measuring
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        """Parameters, FLOPs/token and (``speed``) throughput of the model as it is at ``stage``."""
        base = unwrap_model(pl_module.model)
        counts = count_parameters_detailed(base)
        # LoRA weights are not part of the deployed (merged) model: count them on their own row
        n_adapter = adapter_parameter_count(pl_module.model)
        row = {"params (total)": counts["total"] - n_adapter, "params (non-embedding)": counts["non_embedding"] - n_adapter,
               f"GFLOPs/token (prefill, {self.seq_len} tokens)": flops_per_token(base, self.seq_len)["total"] / 1e9}
        if n_adapter:
            row["LoRA adapter params (merged at export)"] = n_adapter
        if self.speed and not get_family(base).measures_throughput:
            raise ConfigError("RunSummaryCallback.speed", True, "false for an encoder-decoder model (T5): throughput "
                              "is measured for decoder-only models (parameters and FLOPs are still reported)")
        if self.speed:
            loaded = machine_load()
            if loaded is not None:
                self.loaded[stage] = loaded
            was_training = pl_module.model.training
            with without_adapter_layers(pl_module.model) as plain:
                result = measure_throughput(plain, batch_size=self.batch_size, seq_len=self.seq_len,
                                            new_tokens=self.new_tokens, repeats=self.repeats, warmup=self.warmup)
            pl_module.model.train(was_training)
            shape = f"batch {self.batch_size} x {self.seq_len}"
            row[f"prefill tokens/s ({shape})"] = result["prefill_tokens_per_s"]
            if result["decode_tokens_per_s"] is not None:
                row[f"decode tokens/s (batch {self.batch_size}, KV cache)"] = result["decode_tokens_per_s"]
            if result.get("prefill_peak_memory_bytes") is not None:
                row["peak memory prefill (GiB)"] = result["prefill_peak_memory_bytes"] / 2**30
        return {k: float(v) for k, v in row.items()}

    # ------------------------------------------------------------- collecting
    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """``{"stages": [...], "rows": {label: {stage: value}}, "plan": {...}, "history": {...}}``."""
        rows: dict[str, dict[str, float]] = {}
        history: dict[str, dict] = {}
        sources = [c for c in trainer.callbacks if isinstance(c, SummarySource) and c is not self]
        for callback in [*sources, self]:  # every evaluation callback, then this one's own rows
            for label, values in callback.summary_rows().items():
                rows.setdefault(label, {}).update(values)
            if callback is not self:
                history[type(callback).__name__] = callback.results
        plan = prunable(pl_module).pruning_plan
        plan_info = None
        if plan is not None:
            plan_info = {"fingerprint": plan.fingerprint(), "realised_sparsity": plan.realised_sparsity,
                         "target_sparsity": plan.provenance.get("sparsity"), "gamma": plan.provenance.get("gamma"),
                         "criterion": plan.provenance.get("criterion")}
        return {"stages": list(SUMMARY_STAGES), "rows": rows, "plan": plan_info, "history": history,
                "loaded": dict(self.loaded),
                "global_step": trainer.global_step,
                "speed_settings": {"batch_size": self.batch_size, "seq_len": self.seq_len,
                                   "new_tokens": self.new_tokens, "repeats": self.repeats, "warmup": self.warmup,
                                   "device": str(trainer.strategy.root_device)} if self.speed else None}

    @staticmethod
    def render(summary: dict) -> str:
        stages = summary["stages"]
        out = ["| metric | " + " | ".join(stages) + " | recovered / dense |", "|---|" + "---|" * (len(stages) + 1)]
        loaded = summary.get("loaded") or {}
        for label, values in summary["rows"].items():
            timed = "tokens/s" in label
            cells = [(_fmt(values[s]) + ("*" if timed and s in loaded else "")) if s in values else "-" for s in stages]
            d, r = values.get("dense"), values.get("recovered")
            ratio = f"{r / d:.3f}" if d and r is not None else "-"
            if timed and ({"dense", "recovered"} & set(loaded)):
                ratio = "- (loaded)"
            out.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
        if loaded:
            out.append("\n* measured while the machine was loaded (load average / cores: "
                       + ", ".join(f"{k} {v['load']:.1f}/{v['cores']}" for k, v in loaded.items())
                       + "): other processes shared the cores, so these tokens/s are not results")
        if summary.get("speed_settings"):
            sp = summary["speed_settings"]
            out.append(f"speed: median of {sp['repeats']} runs after {sp['warmup']} warm-up runs on {sp['device']}, "
                       "each stage measured once during the run (for careful ratios: benchmarks/speedup.py)")
        if summary.get("plan"):
            p = summary["plan"]
            out.append(f"plan {p['fingerprint']}: {p['criterion']}, target sparsity {p['target_sparsity']}, "
                       f"gamma {p['gamma']}, realised block-weight sparsity {p['realised_sparsity']:.4f}")
        n_row = len(summary["rows"]) + 2
        return "\n".join(out[:n_row]) + ("\n\n" + "\n\n".join(out[n_row:]) if out[n_row:] else "")

    @rank_zero_only
    def _write(self, log_dir: Path, table: str) -> None:
        write_text_atomic(log_dir / "summary.md", "# Run summary\n\n" + table + "\n")
        write_text_atomic(log_dir / "summary.json", json.dumps(self.summary, indent=1))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "loaded": {k: dict(v) for k, v in self.loaded.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        # 0.1 checkpoints keep the measurements under "measured"
        super().load_state_dict({"results": state_dict.get("results", state_dict.get("measured", {}))})
        self.loaded = {k: dict(v) for k, v in state_dict.get("loaded", {}).items()}


def machine_load() -> dict | None:
    """``{"load", "cores"}`` when the 1-minute load average exceeds the cores this process may use, else None.

    The run's own process is idle while it measures, so a load above the core count means other work
    shares the cores (``benchmarks/speedup.py`` flags OVERSUBSCRIBED the same way, with 0.5 of slack).
    """
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    except OSError:
        return None
    return {"load": load, "cores": cores} if load > cores else None


def _fmt(value: float) -> str:
    if float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"
