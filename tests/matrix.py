"""The combination matrix: every feature axis, declared once, and the pairwise covering set of tiny fits.

A new setting joins :data:`AXES` (and, if some of its values cannot combine, :data:`REFUSALS`, with the
error that says so before any weight loads). :func:`cells` is allpairspy's covering set: every pair of
values of any two axes occurs in at least one cell (``tests/test_matrix.py`` checks that independently).
Each cell becomes one ``python -m nirvana_lightning fit`` config (:func:`cell_config`).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

#: axis -> values. Families: one per distinct code path (llama: GQA and tied embeddings; qwen3: explicit
#: head_dim and q/k norms; gemma3: soft-capping, one KV group per layer; t5: encoder-decoder; phi3: fused
#: projections, units at offsets; olmo2: full-width q/k norms cut with their heads, masking hooks). Mistral and
#: Qwen2 are Llama's code path with other names (families/mistral.py, qwen2.py): their invariants are in
#: tests/test_families.py.
AXES: dict[str, list[str]] = {
    "family": ["tiny-llama", "tiny-qwen3", "tiny-gemma3", "tiny-t5", "tiny-phi3", "tiny-olmo2"],
    "strategy": ["single", "ddp", "fsdp2"],
    "granularity": ["group", "query_head"],
    "selection": ["none", "kl"],
    "gamma": ["fixed", "auto"],
    "schedule": ["once", "iterative"],
    "recovery": ["lora", "full", "kd", "none"],
    "export": ["hf", "gguf", "int8"],
    "criterion": ["nirvana", "taylor", "magnitude", "wanda_sp", "flap", "random"],
}

#: documented refusals: (what, predicate on a cell, the last line's pattern). Each is raised before any
#: weight loads (the matrix test checks that transformers printed no "Loading weights"), except where
#: :data:`AFTER_THE_PLAN` says it depends on the plan: then it comes after scoring, before any training step.
REFUSALS: list[tuple[str, object, str]] = [
    ("KL selection ranks calibration sets; data-free criteria read none",
     lambda c: c.get("selection") == "kl" and c.get("criterion") in ("magnitude", "random"),
     r"NirvanaPruningCallback\.selection\.method='kl' .*'none' with scoring\.criterion"),
    ("GGUF holds the Llama-like graphs only (llama.cpp has no per-layer Gemma 3, T5, Phi-3 or OLMo-2 graph here)",
     lambda c: c.get("export") == "gguf" and c.get("family") in ("tiny-gemma3", "tiny-t5", "tiny-phi3", "tiny-olmo2"),
     r"ExportCallback\.format='gguf' .*hf only for model_type"),
    ("a qwen3 GGUF needs equal widths in every layer (llama.cpp's per-layer graph has no q/k norms); the "
     "widths exist once the plan does: refused after scoring, before any training step",
     lambda c: c.get("export") == "gguf" and c.get("family") == "tiny-qwen3",
     r"ExportCallback\.format='gguf' .*qwen3 with per-layer widths"),
    ("gamma 'auto' searches one cut; an iterative schedule fixes each step's counts from a number",
     lambda c: c.get("gamma") == "auto" and c.get("schedule") == "iterative",
     r"NirvanaPruningCallback\.target\.gamma='auto' .*a number with an iterative schedule"),
    ("T5's attention is multi-head: one head is already one unit (no query-head granularity)",
     lambda c: c.get("family") == "tiny-t5" and c.get("granularity") == "query_head",
     r"attention_granularity='query_head' .*'group' for t5"),
    ("several processes train nothing with recovery none (no gradient for DDP / FSDP2 to synchronise)",
     lambda c: c.get("recovery") == "none" and c.get("strategy") in ("ddp", "fsdp2"),
     r"model\.recovery='none' .*with several processes"),
]


#: the refusals that depend on the plan's widths (the first words of their ``what``)
AFTER_THE_PLAN = ("a qwen3 GGUF",)


def refusal(cell: dict) -> tuple[str, str] | None:
    """The documented refusal a cell meets first, ``(what, pattern)``, or None when it must run."""
    for what, applies, pattern in REFUSALS:
        if applies(cell):
            return what, pattern
    return None


def cells() -> list[dict[str, str]]:
    """The pairwise covering set (allpairspy), in a fixed order; cells named ``c00``, ``c01``, ..."""
    from allpairspy import AllPairs

    names = list(AXES)

    def runs(partial: list[str]) -> bool:  # allpairspy grows rows axis by axis: a refused prefix is dropped
        return refusal(dict(zip(names, partial))) is None

    rows = [dict(zip(names, values)) for values in AllPairs([AXES[n] for n in names], filter_func=runs)]
    # allpairspy's filtering can leave valid pairs uncovered: add a greedy cell for each one left
    while missing := uncovered_pairs(rows):
        (a, x), (b, y) = missing[0]
        row = {a: x, b: y}
        todo = set(missing)
        for axis in names:
            if axis in row:
                continue
            def gain(value, axis=axis):
                trial = row | {axis: value}
                return (refusal(trial) is None,
                        sum(((p, trial[p]), (q, trial[q])) in todo for p, q in itertools.combinations(names, 2)
                            if p in trial and q in trial))
            row[axis] = max(AXES[axis], key=gain)
        assert refusal(row) is None, row
        rows.append({n: row[n] for n in names})
    return rows


def uncovered_pairs(rows: list[dict[str, str]]) -> list[tuple]:
    """Every ``((axis, value), (axis, value))`` pair that no row holds and that is not itself a documented
    refusal (empty for a covering set)."""
    seen = {((a, r[a]), (b, r[b])) for r in rows for a, b in itertools.combinations(AXES, 2)}
    return [((a, x), (b, y)) for a, b in itertools.combinations(AXES, 2) for x in AXES[a] for y in AXES[b]
            if ((a, x), (b, y)) not in seen and refusal({a: x, b: y}) is None]


#: one cell per documented refusal (the pair that is refused, the rest the defaults of a plain run)
BASE_CELL = {"family": "tiny-llama", "strategy": "single", "granularity": "group", "selection": "none",
             "gamma": "fixed", "schedule": "once", "recovery": "lora", "export": "hf", "criterion": "nirvana"}
REFUSAL_CELLS = [BASE_CELL | {"selection": "kl", "criterion": "magnitude"},
                 BASE_CELL | {"export": "gguf", "family": "tiny-t5"},
                 BASE_CELL | {"export": "gguf", "family": "tiny-gemma3"},
                 BASE_CELL | {"export": "gguf", "family": "tiny-phi3"},
                 BASE_CELL | {"export": "gguf", "family": "tiny-olmo2"},
                 BASE_CELL | {"export": "gguf", "family": "tiny-qwen3"},
                 BASE_CELL | {"gamma": "auto", "schedule": "iterative"},
                 BASE_CELL | {"family": "tiny-t5", "granularity": "query_head"},
                 BASE_CELL | {"recovery": "none", "strategy": "ddp"},
                 BASE_CELL | {"recovery": "none", "strategy": "fsdp2"}]


def n_pairs() -> int:
    return sum(len(AXES[a]) * len(AXES[b]) for a, b in itertools.combinations(AXES, 2))


def cell_id(i: int, cell: dict) -> str:
    short = {"tiny-": "", "query_head": "qh", "iterative": "iter", "wanda_sp": "wanda"}
    text = "-".join(cell.values())
    for a, b in short.items():
        text = text.replace(a, b)
    return f"c{i:02d}-{re.sub(r'[^a-z0-9_-]', '', text)}"


def cell_config(cell: dict, out: Path, *, reference: bool = False) -> dict:
    """The fit config of ``cell`` writing under ``out``. ``reference``: the single-process run that only makes
    the first plan of a multi-process cell (one step, no validation, no export), to compare plans."""
    strategy = "single" if reference else cell["strategy"]
    trainer: dict = {"accelerator": "cpu", "devices": 1 if strategy == "single" else 2, "max_steps": 3,
                     "limit_val_batches": 1, "val_check_interval": 2, "log_every_n_steps": 1,
                     "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                     "default_root_dir": str(out / "run")}
    if strategy == "ddp":
        trainer["strategy"] = "ddp"
    elif strategy == "fsdp2":
        trainer["strategy"] = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                               "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}
    target: dict = {"sparsity": 0.3, "gamma": 2.0 if cell["gamma"] == "fixed" else "auto", "round_to": 8,
                    "attention_granularity": cell["granularity"]}
    if cell["gamma"] == "auto":
        target["gamma_grid"] = [1.0, 3.0]
    pruning: dict = {"target": target, "scoring": {"criterion": cell["criterion"]},
                     "calibration": {"samples": 4, "seq_len": 16}}
    if cell["selection"] == "kl":
        pruning["selection"] = {"method": "kl", "num_candidates": 2, "probe_samples": 4, "probe_seq_len": 16}
    elif cell["gamma"] == "auto":
        pruning["selection"] = {"probe_samples": 4, "probe_seq_len": 16}
    if cell["schedule"] == "iterative":
        pruning["schedule"] = {"kind": "linear", "n_steps": 2, "every_n_steps": 2}
    export: dict = {"path": str(out / "export")}
    if cell["export"] == "gguf":
        export.update(format=["hf", "gguf"], gguf_dtypes=["f32"])
    elif cell["export"] == "int8":
        export["quantize"] = "int8_weight_only"
    model: dict = {"source": cell["family"], "lr": 1.0e-3, "warmup_steps": 1,
                   "recovery": {"kd": "full"}.get(cell["recovery"], cell["recovery"])}
    if cell["recovery"] == "kd":
        model["objective"] = "kd"
    if cell["recovery"] == "lora":
        model.update(lora_r=4, lora_dropout=0.0)
    trainer["callbacks"] = [
        {"class_path": "nirvana_lightning.NirvanaPruningCallback", "init_args": pruning},
        {"class_path": "rank_record.RecordCell", "init_args": {"out_dir": str(out)}},  # before the export merges
        {"class_path": "nirvana_lightning.ExportCallback", "init_args": export},
    ]
    if reference:  # the first plan is made at setup: one step, nothing else
        trainer.update(max_steps=1, limit_val_batches=0, callbacks=trainer["callbacks"][:1])
    data = {"task": "lm", "sources": ["brown"], "seq_len": 32, "max_train_windows": 16, "max_val_windows": 2,
            "batch_size": 2}
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}
