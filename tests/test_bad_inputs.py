"""A table of bad inputs and faults (issue 15): each gives a clear error naming the key or file and the value.

Every row is ``(case id, action, exception type, pattern the message must match)``. Actions run in
process on tiny models (milliseconds each); the CLI rows run ``python -m nirvana_lightning`` and check
the exit status 2, one error line and no traceback. Faults (SIGKILL during save, NaN training, malicious
checkpoints, flipped bytes, a full disk) are in ``test_atomic.py``, ``test_security.py`` and
``test_export.py``; ``CASE_COUNT`` below counts this table.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nirvana_lightning import (
    Calibration,
    ConfigError,
    ExportCallback,
    KLToDenseCallback,
    LmEvalCallback,
    NirvanaDataModule,
    NirvanaModule,
    NirvanaPruningCallback,
    PerplexityCallback,
    PruningTarget,
    RunSummaryCallback,
    Schedule,
    Scoring,
    Selection,
)

REPO = Path(__file__).resolve().parents[1]
INF, NAN = math.inf, math.nan


def module(**kw):
    return lambda: NirvanaModule(**{"source": "tiny-llama", **kw})


def data(**kw):
    return lambda: NirvanaDataModule(**{"tokenizer": "tiny-llama", **kw})


SETTINGS = {"target": PruningTarget, "scoring": Scoring, "calibration": Calibration, "selection": Selection,
            "schedule": Schedule}


def pruning(**kw):
    """The callback, each settings section given as a dict of its fields (``target=dict(sparsity=1.0)``).

    A bad field raises in its settings object's constructor, before the callback exists, so its key is
    ``<section>.<field>``; a bad combination of settings is the callback's, ``NirvanaPruningCallback.<key>``.
    """
    def build():
        return NirvanaPruningCallback(**{k: SETTINGS[k](**v) if k in SETTINGS and isinstance(v, dict) else v
                                         for k, v in kw.items()})
    return build


MODULE = [
    ("source unknown", module(source="nope"), r"model\.source='nope'"),
    ("source empty", module(source=""), r"model\.source=''"),
    ("source missing dir", module(source="/no/such/dir"), r"model\.source='/no/such/dir'"),
    ("dtype", module(dtype="float8"), r"model\.dtype='float8'.*'float32'"),
    ("recovery", module(recovery="qlora"), r"model\.recovery='qlora'.*'lora'"),
    ("lora target", module(lora_targets=["q", "x"]), r"model\.lora_targets\[1\]='x'"),
    ("lr zero", module(lr=0), r"model\.lr=0 .*finite number > 0"),
    ("lr negative", module(lr=-1e-3), r"model\.lr=-0\.001"),
    ("lr inf", module(lr=INF), r"model\.lr=inf"),
    ("lr nan", module(lr=NAN), r"model\.lr=nan"),
    ("lr string", module(lr="fast"), r"model\.lr='fast'"),
    ("lora_r zero", module(lora_r=0), r"model\.lora_r=0"),
    ("lora_r bool", module(lora_r=True), r"model\.lora_r=True"),
    ("warmup negative", module(warmup_steps=-1), r"model\.warmup_steps=-1"),
    ("weight decay negative", module(weight_decay=-0.1), r"model\.weight_decay=-0\.1"),
    ("weight decay nan", module(weight_decay=NAN), r"model\.weight_decay=nan"),
    ("lora dropout 1", module(lora_dropout=1.0), r"model\.lora_dropout=1\.0 .*\[0, 1\)"),
    ("lora dropout negative", module(lora_dropout=-0.1), r"model\.lora_dropout=-0\.1"),
    ("lora dropout nan", module(lora_dropout=NAN), r"model\.lora_dropout=nan"),
    ("min lr ratio", module(min_lr_ratio=1.5), r"model\.min_lr_ratio=1\.5"),
    ("min lr ratio nan", module(min_lr_ratio=NAN), r"model\.min_lr_ratio=nan"),
    ("objective", module(objective="rl"), r"model\.objective='rl'"),
    ("kd temperature zero", module(kd_temperature=0), r"model\.kd_temperature=0"),
    ("kd temperature nan", module(kd_temperature=NAN), r"model\.kd_temperature=nan"),
    ("kd temperature inf", module(kd_temperature=INF), r"model\.kd_temperature=inf"),
    ("kd alpha", module(kd_alpha=1.5), r"model\.kd_alpha=1\.5"),
    ("kd alpha nan", module(kd_alpha=NAN), r"model\.kd_alpha=nan"),
    ("teacher dtype", module(teacher_dtype="int8"), r"model\.teacher_dtype='int8'"),
    ("teacher device", module(teacher_device="gpu:7"), r"model\.teacher_device='gpu:7'"),
    ("kd without training", module(objective="kd", recovery="none"), r"model\.objective='kd'"),
]

DATA = [
    ("seq_len zero", data(seq_len=0), r"data\.seq_len=0"),
    ("seq_len negative", data(seq_len=-4), r"data\.seq_len=-4"),
    ("task", data(task="chat"), r"data\.task='chat'"),
    ("val fraction", data(val_fraction=1.5), r"data\.val_fraction=1\.5"),
    ("val fraction nan", data(val_fraction=NAN), r"data\.val_fraction=nan"),
    ("missing source", data(sources=["/no/such/file.jsonl"]), r"data\.sources\[0\]='/no/such/file\.jsonl'"),
    ("source suffix", data(sources=[str(REPO / "pyproject.toml")]), r"data\.sources\[0\]=.*pyproject\.toml"),
    ("tokenizer", data(tokenizer="not-a-model"), r"data\.tokenizer='not-a-model'"),
    ("batch size", data(batch_size=0), r"data\.batch_size=0"),
    ("num workers", data(num_workers=-1), r"data\.num_workers=-1"),
]

PRUNING = [
    ("sparsity 1", pruning(target=dict(sparsity=1.0)), r"target\.sparsity=1\.0 .*\[0, 1\)"),
    ("sparsity negative", pruning(target=dict(sparsity=-0.1)), r"target\.sparsity=-0\.1"),
    ("sparsity nan", pruning(target=dict(sparsity=NAN)), r"target\.sparsity=nan"),
    ("sparsity string", pruning(target=dict(sparsity="half")), r"target\.sparsity='half'"),
    ("gamma zero", pruning(target=dict(gamma=0)), r"target\.gamma=0"),
    ("gamma inf", pruning(target=dict(gamma=INF)), r"target\.gamma=inf"),
    ("gamma nan", pruning(target=dict(gamma=NAN)), r"target\.gamma=nan"),
    ("gamma word", pruning(target=dict(gamma="best")), r"target\.gamma='best' .*'auto'"),
    ("gamma grid empty", pruning(target=dict(gamma="auto", gamma_grid=[])), r"target\.gamma_grid=\[\]"),
    ("gamma grid zero", pruning(target=dict(gamma="auto", gamma_grid=[1, 0])), r"target\.gamma_grid=\[1, 0\]"),
    ("criterion", pruning(scoring=dict(criterion="l2")), r"scoring\.criterion='l2'.*'nirvana'"),
    ("functional", pruning(scoring=dict(functional="mean")), r"scoring\.functional='mean'"),
    ("round_to", pruning(target=dict(round_to=7)), r"target\.round_to=7"),
    ("allocation", pruning(target=dict(allocation="layer")), r"target\.allocation='layer'"),
    ("skip layer negative", pruning(target=dict(skip_layers=[0, -1])), r"target\.skip_layers\[1\]=-1"),
    ("schedule", pruning(schedule=dict(kind="exp")), r"schedule\.kind='exp'"),
    ("n_steps zero", pruning(schedule=dict(n_steps=0)), r"schedule\.n_steps=0"),
    ("once with steps", pruning(schedule=dict(n_steps=3)), r"schedule\.kind='once'"),
    ("linear without timing", pruning(schedule=dict(kind="linear", n_steps=2)), r"schedule\.at_epochs=None"),
    ("epochs unordered", pruning(schedule=dict(kind="linear", n_steps=2, at_epochs=[2, 1])),
     r"schedule\.at_epochs=\[2, 1\]"),
    ("epochs count", pruning(schedule=dict(kind="linear", n_steps=3, at_epochs=[0, 1])), r"schedule\.at_epochs"),
    ("every_n_steps zero", pruning(schedule=dict(kind="linear", n_steps=2, every_n_steps=0)),
     r"schedule\.every_n_steps=0"),
    ("schedule with budget", pruning(target=dict(sparsity=None, param_budget=10),
                                     schedule=dict(kind="linear", n_steps=2, every_n_steps=5)),
     r"NirvanaPruningCallback\.schedule\.kind='linear'"),
    ("schedule with auto gamma", pruning(target=dict(gamma="auto"), schedule=dict(kind="linear", n_steps=2,
                                                                                  every_n_steps=5)),
     r"NirvanaPruningCallback\.target\.gamma='auto'"),
    ("schedule with compensation", pruning(schedule=dict(kind="linear", n_steps=2, every_n_steps=5),
                                           bias_compensation=True),
     r"NirvanaPruningCallback\.bias_compensation=True"),
    ("sparsity and budget", pruning(target=dict(sparsity=0.2, param_budget=1000)), r"target\.sparsity=0\.2"),
    ("neither target", pruning(target=dict(sparsity=None)), r"target\.sparsity=None"),
    ("budget zero", pruning(target=dict(sparsity=None, param_budget=0)), r"target\.param_budget=0"),
    ("plan path missing", pruning(plan_path="/no/plan.json"), r"NirvanaPruningCallback\.plan_path='/no/plan\.json'"),
    ("select", pruning(selection=dict(method="bleu")), r"selection\.method='bleu'"),
    ("select with magnitude", pruning(selection=dict(method="kl"), scoring=dict(criterion="magnitude")),
     r"NirvanaPruningCallback\.selection\.method='kl'"),
    ("select with plan", pruning(selection=dict(method="kl"), plan_path="/no/plan.json"),
     r"NirvanaPruningCallback\.selection\.method='kl'"),
    ("candidates zero", pruning(selection=dict(num_candidates=0)), r"selection\.num_candidates=0"),
    ("candidate mode", pruning(selection=dict(candidate_mode="best")), r"selection\.candidate_mode='best'"),
    ("probe samples", pruning(selection=dict(probe_samples=0)), r"selection\.probe_samples=0"),
    ("probe seq_len", pruning(selection=dict(probe_seq_len=-8)), r"selection\.probe_seq_len=-8"),
    ("calibration samples", pruning(calibration=dict(samples=0)), r"calibration\.samples=0"),
    ("calibration samples bool", pruning(calibration=dict(samples=True)), r"calibration\.samples=True"),
    ("calibration seq_len", pruning(calibration=dict(seq_len=-1)), r"calibration\.seq_len=-1"),
    ("calibration seed", pruning(calibration=dict(seed=-1)), r"calibration\.seed=-1"),
    ("micro batch", pruning(scoring=dict(micro_batch_size=0)), r"scoring\.micro_batch_size=0"),
    ("accumulate", pruning(scoring=dict(accumulate="mean")), r"scoring\.accumulate='mean'"),
    ("scoring dtype", pruning(scoring=dict(dtype="fp8")), r"scoring\.dtype='fp8'"),
    ("scoring device", pruning(scoring=dict(device="gpu:7")), r"scoring\.device='gpu:7'"),
    ("scoring checkpointing", pruning(scoring=dict(checkpointing="yes")), r"scoring\.checkpointing='yes'"),
    ("tp_size zero", pruning(target=dict(tp_size=0)), r"target\.tp_size=0"),
    ("offload with kl", pruning(scoring=dict(device="+0"), selection=dict(method="kl")),
     r"NirvanaPruningCallback\.scoring\.device='\+0'"),
    # issue 25: types normalised at the edge (a dict, a bare sparsity, a string criterion are accepted: see
    # test_settings_accept_what_users_write); what cannot be normalised names the argument
    ("settings as a list", lambda: NirvanaPruningCallback(target=[0.2]),
     r"NirvanaPruningCallback\.target=\[0\.2\] .*PruningTarget, a mapping of its fields"),
    ("settings dict typo", lambda: NirvanaPruningCallback(target={"sparsty": 0.2}),
     r"NirvanaPruningCallback\.target\.sparsty=0\.2 .*field of PruningTarget"),
    ("skip_layers bool", pruning(target=dict(skip_layers=True)), r"target\.skip_layers=True"),
    ("gamma_grid string", pruning(target=dict(gamma="auto", gamma_grid="1,2")), r"target\.gamma_grid='1,2'"),
    ("probe_seq_len 1", pruning(selection=dict(method="kl", probe_seq_len=1)), r"selection\.probe_seq_len=1"),
]

CALLBACKS = [
    ("export path", lambda: ExportCallback(path=""), r"ExportCallback\.path=''"),
    ("export format", lambda: ExportCallback(format="onnx"), r"ExportCallback\.format='onnx'"),
    ("export gguf dtype", lambda: ExportCallback(format="gguf", gguf_dtypes=["q2_k"]),
     r"ExportCallback\.gguf_dtypes='q2_k'"),
    ("export adapter gguf", lambda: ExportCallback(format=["hf", "gguf"], adapter_only=True),
     r"ExportCallback\.adapter_only=True"),
    ("export gguf types repeated", lambda: ExportCallback(format="gguf", gguf_dtypes=["f16", "f16"]),
     r"ExportCallback\.gguf_dtypes=\['f16', 'f16'\] .*each type once"),
    ("export quantize method", lambda: ExportCallback(quantize="int4"), r"ExportCallback\.quantize='int4'"),
    ("export quantize gguf only", lambda: ExportCallback(format="gguf", quantize="int8_weight_only"),
     r"ExportCallback\.quantize='int8_weight_only' .*format includes hf"),
    ("export quantize adapter", lambda: ExportCallback(adapter_only=True, quantize="int8_weight_only"),
     r"ExportCallback\.quantize=.*adapter_only"),
    ("ppl seq_len", lambda: PerplexityCallback(seq_len=0), r"PerplexityCallback\.seq_len=0"),
    ("ppl stride", lambda: PerplexityCallback(seq_len=64, stride=128), r"PerplexityCallback\.stride=128"),
    ("ppl max tokens", lambda: PerplexityCallback(max_tokens=0), r"PerplexityCallback\.max_tokens=0"),
    ("ppl every_n", lambda: PerplexityCallback(every_n_steps=0), r"every_n_steps=0"),
    ("ppl dataset", lambda: PerplexityCallback(datasets={"x": "/no/file.txt"}), r"/no/file\.txt"),
    ("lm-eval task", lambda: LmEvalCallback(tasks=["no_such_task"]), r"LmEvalCallback\.tasks.*no_such_task"),
    ("lm-eval limit", lambda: LmEvalCallback(limit=0), r"LmEvalCallback\.limit=0"),
    ("lm-eval batch", lambda: LmEvalCallback(batch_size=0), r"LmEvalCallback\.batch_size=0"),
    ("kl device", lambda: KLToDenseCallback(device="tpu"), r"KLToDenseCallback\.device='tpu'"),
    ("kl batches", lambda: KLToDenseCallback(max_batches=0), r"KLToDenseCallback\.max_batches=0"),
    ("summary batch", lambda: RunSummaryCallback(batch_size=0), r"RunSummaryCallback\.batch_size=0"),
    ("summary seq_len", lambda: RunSummaryCallback(seq_len=-1), r"RunSummaryCallback\.seq_len=-1"),
    ("summary repeats", lambda: RunSummaryCallback(repeats=0), r"RunSummaryCallback\.repeats=0"),
    ("summary new tokens nan", lambda: RunSummaryCallback(new_tokens=NAN), r"RunSummaryCallback\.new_tokens=nan"),
]


def _tiny():
    from nirvana_lightning import load_model

    return load_model("tiny-llama")[0]


def _make_plan(calibration, **kw):
    from nirvana_lightning import make_plan

    return lambda: make_plan(_tiny(), calibration, **{"sparsity": 0.2, **kw})


def _save_gguf(path="x.gguf", dtype="f16", family="tiny-qwen3", foreign_plan=False, **kw):
    def run():
        from nirvana_lightning import load_tokenizer, prune, save_gguf
        from nirvana_lightning.debug_models import build_tiny_model

        tok = load_tokenizer("tiny-llama")
        model = build_tiny_model(family, vocab_size=len(tok), head_dim=32)
        plan = prune(model, torch.randint(0, 1000, (2, 8)), sparsity=0.4, round_to=1)
        if foreign_plan:  # the plan of another cut (uniform widths, so the GGUF itself would be writable)
            other = build_tiny_model(family, vocab_size=len(tok), head_dim=32)
            plan = prune(other, None, sparsity=0.2, criterion="magnitude", allocation="uniform", round_to=1)
            model = build_tiny_model(family, vocab_size=len(tok), head_dim=32)
        save_gguf(model, tok, Path(os.environ["BAD_INPUT_TMP"]) / path, plan, dtype=dtype, **kw)
    return run


def _prune(**kw):
    def run():
        from nirvana_lightning import prune

        prune(_tiny(), torch.randint(0, 200, (2, 8)), **kw)
    return run


API = [
    ("calibration float", _make_plan(torch.rand(2, 8)), r"calibration=.*float32"),
    ("calibration 1-d", _make_plan(torch.zeros(8, dtype=torch.long)), r"calibration=.*\(8,\)"),
    ("calibration empty rows", _make_plan(torch.zeros((0, 8), dtype=torch.long)), r"shape \(0, 8\)"),
    ("calibration empty cols", _make_plan(torch.zeros((2, 0), dtype=torch.long)), r"shape \(2, 0\)"),
    ("calibration ids too large", _make_plan(torch.full((2, 8), 10**7)), r"token ids in \[10000000"),
    ("calibration ids negative", _make_plan(torch.full((2, 8), -3)), r"token ids in \[-3"),
    ("calibration none", _make_plan(None), r"calibration=None"),
    ("calibration empty list", _make_plan([]), r"calibration='an empty iterable'"),
    ("padded batch", _make_plan([{"input_ids": torch.ones(1, 4, dtype=torch.long),
                                   "attention_mask": torch.tensor([[1, 1, 0, 0]])}]), r"calibration='a padded batch'"),
    ("api criterion", _make_plan(None, criterion="obs"), r"criterion='obs'"),
    ("api functional", _make_plan(None, functional="min"), r"functional='min'"),
    ("api sparsity", _make_plan(None, sparsity=1.2), r"sparsity=1\.2"),
    ("api gamma", _make_plan(None, gamma=-1.0, criterion="magnitude"), r"gamma=-1\.0"),
    ("api skip layer", _make_plan(None, skip_layers=[9], criterion="magnitude"), r"skip_layers=9"),
    ("api round_to", _make_plan(None, round_to=3, criterion="magnitude"), r"round_to=3"),
    ("api round_to too wide", _make_plan(None, sparsity=0.6, round_to=128, criterion="magnitude", gamma=3.0),
     r"round_to=128 .*narrowest has 128"),
    ("api budget below fixed", _make_plan(None, sparsity=None, param_budget=10, criterion="magnitude"),
     r"param_budget=10"),
    ("api tp_size not dividing", _make_plan(None, tp_size=4, criterion="magnitude"), r"tp_size=4"),
    ("gguf dtype", _save_gguf(dtype="q3_k", family="tiny-llama"), r"save_gguf: dtype='q3_k'"),
    ("gguf path suffix", _save_gguf(path="model.bin", family="tiny-llama"), r"save_gguf: path=.*model\.bin"),
    ("gguf qwen3 per-layer", _save_gguf(), r"qwen3 with per-layer widths.*q/k norms"),
    ("gguf another model's plan", _save_gguf(family="tiny-llama", foreign_plan=True),
     r"save_gguf: plan='\w+' .*the plan this model was cut with"),
    ("api target string", _prune(target="half"), r"prune: target='half' .*PruningTarget"),
    ("api scoring number", _prune(target=0.2, scoring=3), r"prune: scoring=3 .*Scoring"),
    ("api target dict typo", _prune(target={"sparsty": 0.2}), r"prune: target\.sparsty=0\.2"),
    ("api gamma auto one-token probe", _prune(sparsity=0.3, gamma="auto", probe=torch.zeros((1, 1), dtype=torch.long)),
     r"probe='tensor \(1, 1\)' .*at least 2 tokens"),
]


def _values_error(fn, *args, **kw):
    return lambda: fn(*args, **kw)


def _load_pruned(path):
    from nirvana_lightning import load_pruned

    return lambda: load_pruned(path)


FILES = [
    ("load_pruned no dir", _load_pruned("/no/such/export"), FileNotFoundError, r"/no/such/export has no config\.json"),
    ("checkpoint missing", lambda: __import__("nirvana_lightning.io", fromlist=["x"]).load_checkpoint("/no/x.ckpt"),
     FileNotFoundError, r"/no/x\.ckpt does not exist"),
]

CASES = ([(f"module: {c}", f, ConfigError, p) for c, f, p in MODULE]
         + [(f"data: {c}", f, ConfigError, p) for c, f, p in DATA]
         + [(f"pruning: {c}", f, ConfigError, p) for c, f, p in PRUNING]
         + [(f"callback: {c}", f, ConfigError, p) for c, f, p in CALLBACKS]
         + [(f"api: {c}", f, ConfigError, p) for c, f, p in API]
         + [(f"files: {c}", f, e, p) for c, f, e, p in FILES])


@pytest.mark.parametrize("case, action, error, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(case, action, error, pattern, tmp_path, monkeypatch):
    monkeypatch.setenv("BAD_INPUT_TMP", str(tmp_path))
    with pytest.raises(error, match=pattern) as info:
        action()
    assert type(info.value) is error or isinstance(info.value, error)
    assert not list(tmp_path.iterdir()), "a refused action left files behind"


CLI = [
    ("cli bad value", ["--model.lr=-1"], r"model\.lr=-1"),
    ("cli nan value", ["--model.lr=.nan"], r"model\.lr=nan"),
    ("cli bad choice", ["--model.recovery=qlora"], r"qlora"),
    ("cli missing source", ["--data.sources=[/missing.txt]"], r"data\.sources\[0\]='/missing\.txt'"),
    ("cli broken source", ["--data.sources=[BROKEN]"], r"data\.sources\[0\]=.*broken\.jsonl:2: invalid JSON"),
    ("cli checkpoint of garbage", ["--ckpt_path=GARBAGE"], r"ckpt_path=.*garbage\.ckpt.*not a readable"),
    ("cli renamed data key", ["--data.calibration_samples=4"],
     r"data\.calibration_samples is not a setting since 0\.2; use NirvanaPruningCallback\.calibration\.samples"),
    # issue 25: each refused before any weight loads, with the key the user wrote
    ("cli misspelled nested key", ["--config=TYPO"],
     r"NirvanaPruningCallback\.target\.sparsty=0\.5 .*did you mean NirvanaPruningCallback\.target\.sparsity"),
    ("cli null section", ["--config=TNULL"], r"NirvanaPruningCallback\.target=None .*mapping of PruningTarget"),
    ("cli fsdp on cpu", ["--trainer.strategy=fsdp"], r"trainer\.strategy='fsdp' .*ModelParallelStrategy"),
    ("cli deepspeed", ["--trainer.strategy=deepspeed"], r"trainer\.strategy='deepspeed'"),
    ("cli ckpt_path directory", ["--ckpt_path=TMPDIR"], r"ckpt_path=.* a plain directory"),
    ("cli ckpt_path foreign torch file", ["--ckpt_path=FOREIGN"], r"ckpt_path=.*foreign\.pt.*no state_dict"),
    ("cli ckpt_path missing", ["--ckpt_path=/no/such.ckpt"], r"ckpt_path='/no/such\.ckpt' .*existing checkpoint"),
    ("cli export claimed by a live run", ["--config=EXPORT_LOCKED"], r"ExportCallback\.path=.*claimed by another"),
    ("cli export not writable", ["--config=EXPORT_UNDER_FILE"],
     r"ExportCallback\.path=.*a writable location \(.*a-file is a file, not a directory\)"),
    ("cli export gguf for t5", ["--config=EXPORT_GGUF", "--model.source=tiny-t5"],
     r"ExportCallback\.format='gguf' .*model_type 't5'"),
    ("cli tp_size not dividing the model", ["--config=TP4"], r"target\.tp_size=4 .*layer 0 has 2 KV groups\)"),
    ("cli compensation on gemma3", ["--config=COMPENSATE", "--model.source=tiny-gemma3"],
     r"NirvanaPruningCallback\.bias_compensation=True .*gemma3"),
    ("cli plan of another model", ["--config=PLAN_QWEN3"], r"plan_path=.*made for another model"),
    ("cli plan with edited unit_cost", ["--config=PLAN_COST"], r"plan_path=.*unit_cost .*differs"),
    ("cli plan provenance null", ["--config=PLAN_PROVENANCE_NULL"], r"plan_path=.*provenance is None"),
    ("cli plan identity a string", ["--config=PLAN_IDENTITY_STRING"], r"plan_path=.*model_identity is 'x'"),
    ("cli plan keep an int", ["--config=PLAN_KEEP_INT"], r"plan_path=.*keep\['neuron'\] is \[5, "),
]

#: whole command lines (no config given by the table)
CLI_RAW = [
    ("cli no subcommand", [], r"subcommand=None .*one of \['fit'"),
    ("cli unknown subcommand", ["frob"], r"subcommand='frob' .*one of \['fit'"),
    ("cli relative config missing", ["fit", "--config", "no/such.yaml"],
     r"--config='no/such\.yaml' .*existing YAML file"),
    ("cli fsdp devices not matching", ["fit", "--config", "configs/debug/tiny_fsdp.yaml", "--trainer.devices=3"],
     r"trainer\.devices=3 .*data_parallel_size=2"),
    ("cli tensor parallel", ["fit", "--config", "configs/debug/tiny_fsdp.yaml",
                             "--trainer.strategy.init_args.tensor_parallel_size=2"],
     r"tensor_parallel_size=2 .*expected 1"),
]


def _plans(tmp_path: Path) -> dict[str, Path]:
    """plan.json files: one made for tiny-qwen3, and tiny-llama plans edited by hand."""
    import copy
    import json

    from nirvana_lightning import load_model, make_plan

    out = {}
    for name, source in (("PLAN_QWEN3", "tiny-qwen3"), ("llama", "tiny-llama")):
        model, _ = load_model(source)
        out[name] = make_plan(model, None, sparsity=0.3, criterion="magnitude").to_dict()
    edits = {"PLAN_COST": lambda d: d["unit_cost"]["neuron"].__setitem__(0, d["unit_cost"]["neuron"][0] + 1),
             "PLAN_PROVENANCE_NULL": lambda d: d.__setitem__("provenance", None),
             "PLAN_IDENTITY_STRING": lambda d: d["provenance"].__setitem__("model_identity", "x"),
             "PLAN_KEEP_INT": lambda d: d["keep"]["neuron"].__setitem__(0, 5)}
    for name, edit in edits.items():
        out[name] = copy.deepcopy(out["llama"])
        edit(out[name])
    paths = {}
    for name in ["PLAN_QWEN3", *edits]:
        paths[name] = tmp_path / f"{name.lower()}.json"
        paths[name].write_text(json.dumps(out[name]))
    return paths


def _pruning_yaml(**init_args) -> str:
    import yaml

    return yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "nirvana_lightning.NirvanaPruningCallback",
         "init_args": {"target": {"sparsity": 0.3}, "calibration": {"samples": 4, "seq_len": 16}, **init_args}}]}})


def _export_yaml(path: Path, **init_args) -> str:
    import yaml

    return yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "nirvana_lightning.ExportCallback", "init_args": {"path": str(path), **init_args}}]}})


def _cli_args(args: list[str], tmp_path: Path) -> list[str]:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(2048))
    files = {"BROKEN": broken, "GARBAGE": garbage, "TMPDIR": tmp_path / "a-directory"}
    files["TMPDIR"].mkdir()
    yamls = {"TYPO": "trainer:\n  callbacks:\n    - class_path: nirvana_lightning.NirvanaPruningCallback\n"
                     "      init_args:\n        target: {sparsty: 0.5}\n",
             "TNULL": "trainer:\n  callbacks:\n    - class_path: nirvana_lightning.NirvanaPruningCallback\n"
                      "      init_args:\n        target: null\n",
             "EXPORT_LOCKED": _export_yaml(tmp_path / "claimed"),
             "EXPORT_UNDER_FILE": _export_yaml(tmp_path / "a-file" / "export"),
             "EXPORT_GGUF": _export_yaml(tmp_path / "gguf-export", format="gguf"),
             "COMPENSATE": _pruning_yaml(bias_compensation=True),
             "TP4": _pruning_yaml(target={"sparsity": 0.3, "tp_size": 4})}
    (tmp_path / "a-file").write_text("not a directory")
    if any("PLAN_" in a for a in args):
        for name, path in _plans(tmp_path).items():
            yamls[name] = _pruning_yaml(plan_path=str(path))
    for name, text in yamls.items():
        files[name] = tmp_path / f"{name.lower()}.yaml"
        files[name].write_text(text)
    if "FOREIGN" in "".join(args):
        files["FOREIGN"] = tmp_path / "foreign.pt"
        torch.save({"weights": torch.zeros(3)}, files["FOREIGN"])
    for name, path in files.items():
        args = [re.sub(rf"\b{name}\b", str(path), a) for a in args]
    return ["fit", "--config", str(REPO / "configs" / "debug" / "tiny.yaml"),
            f"--trainer.default_root_dir={tmp_path / 'run'}", *args]


@pytest.mark.parametrize("case, args, pattern", CLI + CLI_RAW, ids=[c[0] for c in CLI + CLI_RAW])
def test_cli_bad_input_exits_2_with_one_line(case, args, pattern, tmp_path, capsys, monkeypatch):
    """In process (the command's own function, ``cli.entry``): exit status 2, our line last and only once, and
    no weight loaded (transformers' "Loading weights" never shows)."""
    from nirvana_lightning.cli import entry
    from nirvana_lightning.io import PathLock

    monkeypatch.chdir(REPO)
    argv = list(args) if (case, args, pattern) in CLI_RAW else _cli_args(args, tmp_path)
    if (case, args, pattern) in CLI_RAW and argv[:1] == ["fit"]:
        argv += ["--trainer.default_root_dir=" + str(tmp_path / "run")]
    capsys.readouterr()  # only what the command prints (the table's plans were made above)
    with PathLock(tmp_path / "claimed"), pytest.raises(SystemExit) as info:  # another live run's claim
        entry(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("nirvana-lightning: error:")]
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0] and re.search(pattern, ours[0]), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert not any((tmp_path / "run").rglob("plan.json")), "work started before the error"
    assert "Loading weights" not in err, "a weight was loaded before the refusal"


def test_cli_bad_input_in_a_fresh_process(tmp_path):
    """The installed command path: ``python -m nirvana_lightning`` exits 2 with the one line last, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "nirvana_lightning", *_cli_args(["--model.lr=-1"], tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines()[-1].startswith("nirvana-lightning: error: model.lr=-1.0 is invalid")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


CASE_COUNT = len(CASES) + len(CLI) + len(CLI_RAW)


def test_the_table_has_at_least_100_cases():
    assert CASE_COUNT >= 100, CASE_COUNT
