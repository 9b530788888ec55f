"""The command line, run as users run it (subprocesses)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "debug" / "tiny.yaml")


def run(*args, cwd=REPO, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "nirvana_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_fast_dev_run(tmp_path):
    r = run("fit", "--config", TINY, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "after recovery: validation perplexity" in r.stderr + r.stdout


def test_tiny_fit_prunes_writes_plan_and_logs(tmp_path):
    r = run("fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    plan = json.loads((log_dir / "plan.json").read_text())
    assert plan["provenance"]["criterion"] == "nirvana" and plan["provenance"]["sparsity"] == 0.4
    assert (log_dir / "plan.md").read_text().startswith("| layer |")
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    keys = {k for row in rows for k, v in row.items() if v}
    assert {"prune/params_before", "prune/params_after", "ppl/val/dense", "ppl/val/pruned", "ppl/val/recovered",
            "ppl/alpaca/recovered", "ppl/val", "kl/val/pruned", "kl/val/recovered", "train/loss", "val/ppl",
            "report/mlp_kept/layer_0"} <= keys
    # the periodic evaluations ran at step 4 of 8 (not at the last step: fit end covers it)
    assert (log_dir / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((log_dir / "summary.json").read_text())
    assert set(summary["rows"]["validation perplexity"]) == {"dense", "pruned", "recovered"}
    assert summary["rows"]["KL to dense (nats/token)"]["dense"] == 0.0
    assert summary["rows"]["KL to dense (nats/token)"]["pruned"] > 0
    assert summary["rows"]["params (total)"]["pruned"] < summary["rows"]["params (total)"]["dense"]
    assert summary["rows"]["params (total)"]["pruned"] == float(plan["provenance"]["params_after"])
    assert any(k.startswith("prefill tokens/s") for k in summary["rows"])
    assert (log_dir / "summary.md").read_text().startswith("# Run summary")
    before = float(next(r["prune/params_before"] for r in rows if r["prune/params_before"]))
    after = float(next(r["prune/params_after"] for r in rows if r["prune/params_after"]))
    assert after < before
    out = r.stderr + r.stdout
    assert "dense (before pruning)" in out and "after recovery" in out and "run summary" in out


def test_tiny_gemma3_config_prunes_query_heads_end_to_end(tmp_path):
    """configs/debug/tiny_gemma3.yaml as written: query heads pruned inside KV groups, plan v2 with q_head, full
    fine-tuning, the report and the run summary; the plan's widths are the model's."""
    config = str(REPO / "configs" / "debug" / "tiny_gemma3.yaml")
    r = run("fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    plan = json.loads((log_dir / "plan.json").read_text())
    assert plan["format"] == "nirvana-lightning/plan/v3" and set(plan["keep"]) == {"kv_group", "q_head", "neuron"}
    assert plan["provenance"]["attention_granularity"] == "query_head"
    assert "query heads kept" in (log_dir / "plan.md").read_text()
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["rows"]["params (total)"]["pruned"] == float(plan["provenance"]["params_after"])
    assert (log_dir / "allocation.json").is_file() and (log_dir / "summary.md").is_file()


def test_validate_and_print_config(tmp_path):
    r = run("validate", "--config", TINY, f"--trainer.default_root_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("fit", "--config", TINY, "--print_config")
    assert r.returncode == 0 and "NirvanaPruningCallback" in r.stdout and "source: tiny-llama" in r.stdout


def test_bad_values_fail_fast_naming_the_key(tmp_path):
    cases = (("--model.source=nope", "model.source='nope'"), ("--data.seq_len=-1", "data.seq_len=-1"),
             ("--data.sources=[/missing.txt]", "data.sources[0]='/missing.txt'"), ("--model.recovery=qlora", "qlora"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "nirvana_lightning", "fit", "--config", TINY, arg,
                               f"--trainer.default_root_dir={tmp_path / str(i)}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (arg, _) in enumerate(cases)]  # independent: all at once (most of each is start-up)
    for i, ((arg, needle), proc) in enumerate(zip(cases, procs)):
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode != 0, arg
        assert needle in stderr, (arg, stderr[-2000:])
        assert not (tmp_path / str(i) / "lightning_logs").exists() or not any((tmp_path / str(i)).rglob("plan.json"))


def test_resume_from_pruned_checkpoint_does_not_prune_again(tmp_path):
    common = ["--config", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=true",
              "--trainer.limit_val_batches=0"]
    r = run("fit", *common, "--trainer.max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    plan = json.loads((tmp_path / "lightning_logs" / "version_0" / "plan.json").read_text())
    r = run("fit", *common, "--trainer.max_steps=4", f"--ckpt_path={ckpt}")
    out = r.stderr + r.stdout
    assert r.returncode == 0, out[-3000:]
    assert "not pruning again" in out and "pruned nirvana" not in out
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["nirvana_pruning_plan"]["keep"] == plan["keep"]
    for i, width in enumerate(len(k) for k in plan["keep"]["neuron"]):
        assert state["state_dict"][f"model.model.layers.{i}.mlp.gate_proj.weight"].shape[0] == width
    r = run("validate", "--config", TINY, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={ckpt}")
    assert r.returncode == 0 and "restored pruning plan" in r.stderr + r.stdout, r.stderr[-3000:]
    # plain Lightning reload (no CLI, no resume_from): shapes come from the saved plan
    from nirvana_lightning import NirvanaModule

    module = NirvanaModule.load_from_checkpoint(ckpt)
    assert module.pruning_plan.fingerprint() == __import__("nirvana_lightning").PruningPlan.from_dict(
        state["nirvana_pruning_plan"]).fingerprint()
    widths = [layer.mlp.gate_proj.weight.shape[0] for layer in module.base_model.model.layers]
    assert widths == [len(k) for k in plan["keep"]["neuron"]]


def test_prune_only_config_exports_a_reloadable_model(tmp_path):
    config = str(REPO / "configs" / "prune_only.yaml")
    r = run("fit", "--config", config, "--model.source=tiny-llama", f"--trainer.default_root_dir={tmp_path}",
            "--data.max_train_windows=64")
    assert r.returncode == 0, r.stderr[-3000:]
    export = tmp_path / "lightning_logs" / "version_0" / "export"
    assert (export / "model.safetensors").is_file() and (export / "modeling_nirvana.py").is_file()
    card = (export / "README.md").read_text()
    assert "criterion | nirvana" in card and "target sparsity | 0.2" in card
    from nirvana_lightning import load_pruned

    model, tokenizer = load_pruned(export)
    plan = json.loads((export / "plan.json").read_text())
    assert [len(k) for k in plan["keep"]["neuron"]] == [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert tokenizer is not None


def test_kl_selection_in_the_callback(tmp_path):
    r = run("fit", "--config", str(REPO / "configs" / "debug" / "tiny_select.yaml"),
            f"--trainer.default_root_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    selection = json.loads((log_dir / "selection.json").read_text())
    assert len(selection["kls"]) == 4 and selection["best_index"] == selection["kls"].index(min(selection["kls"]))
    plan = json.loads((log_dir / "plan.json").read_text())
    assert plan["provenance"]["selection"]["winner_fingerprint"] == selection["winner_fingerprint"]
    assert "(selected)" in (log_dir / "selection.md").read_text()
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    assert any(r.get("select/kl_3") for r in rows)
    assert "calibration selection" in (log_dir / "export" / "README.md").read_text()
