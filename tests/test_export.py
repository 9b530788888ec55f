"""Pruned checkpoints reload anywhere: fresh processes, with and without nirvana_lightning."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nirvana_lightning import prune
from nirvana_lightning.debug_models import CAUSAL_TINY, build_tiny_model
from nirvana_lightning.export import load_pruned, save_pruned
from nirvana_lightning.loading import load_pruned_adapter
from nirvana_lightning.recovery import apply_recovery

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))

# Runs in a fresh interpreter: logits and greedy tokens for every directory given.
_RELOAD = textwrap.dedent('''
    import importlib.util, json, sys
    mode, ids_file, out_file, *dirs = sys.argv[1:]
    if mode == "remote":
        # prove nirvana_lightning is NOT importable: drop the repo from sys.path and the editable finder
        sys.path = [p for p in sys.path if "nirvana" not in p and p not in ("", ".") and not p.endswith("/main")]
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        assert importlib.util.find_spec("nirvana_lightning") is None, "nirvana_lightning is importable"
    import torch
    ids = torch.load(ids_file)
    out = {}
    for d in dirs:
        if mode == "remote":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype="auto").eval()
        else:
            from nirvana_lightning import load_pruned
            model, _ = load_pruned(d)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        tokens = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)
        out[d] = {"logits": logits, "tokens": tokens, "dtype": str(logits.dtype), "cls": type(model).__name__,
                  "tied": model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()}
    torch.save(out, out_file)
''')


def _reload_in_fresh_process(mode, dirs, tmp_path, ids=IDS):
    script, ids_file, out_file = tmp_path / "reload.py", tmp_path / "ids.pt", tmp_path / f"out_{mode}.pt"
    script.write_text(_RELOAD)
    torch.save(ids, ids_file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cwd = tmp_path if mode == "remote" else Path(__file__).parents[1]
    r = subprocess.run([sys.executable, str(script), mode, str(ids_file), str(out_file), *map(str, dirs)],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out_file)


def _reference(model, ids=IDS):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits, model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)


def test_fresh_process_round_trip_every_family(tmp_path):
    """Every family at both attention granularities (query_head: layers with their own query heads per KV head)."""
    dirs, refs = [], {}
    for name in CAUSAL_TINY:
        for granularity in ("group", "query_head"):
            model = build_tiny_model(name)
            plan = prune(model, IDS, sparsity=0.45, gamma=1.5, attention_granularity=granularity)
            d = tmp_path / f"{name}-{granularity}"
            save_pruned(model, None, d, plan)
            dirs.append(d)
            refs[str(d)] = _reference(model)
    for mode in ("package", "remote"):
        out = _reload_in_fresh_process(mode, dirs, tmp_path)
        for d, (logits, tokens) in refs.items():
            assert torch.equal(out[d]["logits"], logits), (mode, d)  # fp32 bitwise
            assert torch.equal(out[d]["tokens"], tokens), (mode, d)
            assert out[d]["cls"].startswith("Nirvana")


def test_smollm2_round_trip_bf16_and_tied_embeddings(smollm2, tmp_path):
    from nirvana_lightning import load_model

    # loaded in bf16 as users do (``.to(bfloat16)`` would also round RoPE's fp32 inv_freq buffer)
    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    ids = tok(["The history of the United States", "A small dog ran"], return_tensors="pt", padding=True).input_ids
    prune(model, ids, sparsity=0.2, gamma=3.0)
    assert model.config.tie_word_embeddings
    save_pruned(model, tok, tmp_path / "smol", None)
    logits, tokens = _reference(model, ids)
    for mode in ("package", "remote"):
        out = _reload_in_fresh_process(mode, [tmp_path / "smol"], tmp_path, ids)[str(tmp_path / "smol")]
        assert out["dtype"] == "torch.bfloat16" and out["tied"], mode
        assert torch.equal(out["logits"], logits) and torch.equal(out["tokens"], tokens), mode
    assert (tmp_path / "smol" / "tokenizer.json").is_file() and (tmp_path / "smol" / "README.md").is_file()


@pytest.mark.parametrize("name,granularity", [("tiny-llama", "group"), ("tiny-gemma3", "query_head")])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_lora_merged_export_equals_unmerged(tmp_path, dtype, tol, name, granularity):
    torch.manual_seed(0)
    model = build_tiny_model(name).to(dtype)
    plan = prune(model, IDS, sparsity=0.4, gamma=1.5, attention_granularity=granularity)
    peft_model = apply_recovery(model, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)  # a trained adapter: B != 0 (LoRA deltas are small next to W)
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=IDS).logits
    save_pruned(peft_model, None, tmp_path / "merged", plan)
    reloaded, _ = load_pruned(tmp_path / "merged")
    with torch.no_grad():
        merged = reloaded(input_ids=IDS).logits
    assert merged.dtype == dtype
    # fp64: the merge is exact; fp32: only rounding, relative to the logit scale (the tiny fixtures use
    # weights of std 0.2, 10x a real init, so their logits are large)
    assert (merged - unmerged).abs().max().item() <= tol * max(1.0, unmerged.abs().max().item())
    assert any("lora_" in n for n, _ in peft_model.named_parameters())  # merging worked on a copy
    save_pruned(peft_model, None, tmp_path / "adapter", plan, adapter_only=True, base_model=name)
    rebuilt, _ = load_pruned_adapter(tmp_path / "adapter", base_model=build_tiny_model(name).to(dtype))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=IDS).logits, unmerged)


def test_writes_are_atomic_and_refuse_existing(tmp_path, monkeypatch):
    model = build_tiny_model("tiny-qwen2")
    plan = prune(model, IDS, sparsity=0.3)
    target = tmp_path / "out"
    import transformers

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, target, plan)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_pruned(model, None, target, plan)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pruned(model, None, target, plan)
    save_pruned(model, None, target, plan, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corrupt_or_mismatched_plan_names_the_layer(tmp_path):
    model = build_tiny_model("tiny-llama")
    plan = prune(model, IDS, sparsity=0.45, gamma=1.5)
    save_pruned(model, None, tmp_path / "m", plan)
    data = json.loads((tmp_path / "m" / "plan.json").read_text())
    data["keep"]["neuron"][1] = data["keep"]["neuron"][1][:-8]
    (tmp_path / "m" / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="plan.json does not match its sha256"):
        load_pruned(tmp_path / "m")
    with pytest.raises(ValueError, match="layer 1"):  # a plan edited on purpose, unverified: still checked
        load_pruned(tmp_path / "m", verify=False)
    (tmp_path / "m" / "plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_pruned(tmp_path / "m", verify=False)


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_merged_model_shares_untouched_tensors_and_equals_peft_merge(tied, dtype):
    """The export's merge copies only the adapted weights and gives peft's merge_and_unload values, bit for bit
    (bf16 base with float32 adapters too); tied embeddings stay one tensor."""
    import copy

    from nirvana_lightning.recovery.lora import merged_model

    model = build_tiny_model("tiny-llama", tie_word_embeddings=tied).to(dtype)
    prune(model, IDS, sparsity=0.4, gamma=1.5)
    peft_model = apply_recovery(model, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=["q", "v", "down"])
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    plain = merged_model(peft_model)
    want = copy.deepcopy(peft_model).merge_and_unload()
    assert plain.state_dict().keys() == want.state_dict().keys()
    base = {n.replace(".base_layer", ""): p for n, p in peft_model.get_base_model().named_parameters()}
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, want.state_dict()[name]), name
        adapted = any(f".{role}." in name for role in ("q_proj", "v_proj", "down_proj"))
        shared = tensor.data_ptr() == base[name].data_ptr() if name in base else True
        assert shared != adapted, name  # untouched weights are the model's own tensors, adapted ones new
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())  # the trained model is untouched
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, want(input_ids=IDS).logits)
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied


def test_best_checkpoint_export_with_adapters_only_checkpoints(tmp_path):
    """ExportCallback(best=True) reloads the best LoRA checkpoint (which holds the adapters only) and exports it."""
    import lightning as L

    from nirvana_lightning import ExportCallback, NirvanaModule
    from nirvana_lightning.data import NirvanaDataModule

    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery="lora", lr=1e-2, warmup_steps=1, lora_r=4, lora_dropout=0.0)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=16, max_val_windows=2, batch_size=2)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(monitor="val/ppl", mode="min", save_top_k=1)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, val_check_interval=2, default_root_dir=tmp_path,
                        callbacks=[checkpoint, ExportCallback(path=str(tmp_path / "export"), best=True)])
    trainer.fit(module, datamodule=data)
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    assert saved["nirvana_base_omitted"] > 0 and all("lora_" in k for k in saved["state_dict"])
    reloaded, _ = load_pruned(tmp_path / "export")
    best = NirvanaModule.load_from_checkpoint(checkpoint.best_model_path, weights_only=True)
    best.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, best.model(input_ids=IDS).logits,
                                   rtol=1e-4, atol=1e-4)  # merged vs unmerged: fp32 rounding


def test_a_plan_whose_query_heads_disagree_with_the_config_is_refused(tmp_path):
    """A query-head plan.json edited to keep other head counts than config.json says is refused, naming the layer."""
    model = build_tiny_model("tiny-llama")
    plan = prune(model, IDS, sparsity=0.0, attention_granularity="query_head")
    save_pruned(model, None, tmp_path / "m", plan)
    data = json.loads((tmp_path / "m" / "plan.json").read_text())
    data["keep"]["q_head"][0] = [0, 2]  # one head in each of the two groups: a valid plan, not this model
    (tmp_path / "m" / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="disagree at layer 0: plan keeps 2 KV groups, 2 query heads"):
        load_pruned(tmp_path / "m", verify=False)
