"""Two CPU processes (gloo DDP): both ranks cut the same plans (at setup and mid-training) and hold
identical weights after training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_two_process_ddp_same_plan_and_weights(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "debug" / "tiny_ddp.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["trainer"]["callbacks"].append({"class_path": "rank_record.RecordRankState",
                                        "init_args": {"out_dir": str(tmp_path)}})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(config)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == cfg["trainer"]["max_steps"]
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert (ranks[0]["scored"], ranks[1]["scored"]) == (2, 0)  # rank 0 scores both steps, rank 1 only cuts
    plan = json.loads(next((tmp_path / "run").rglob("plan.json")).read_text())
    assert plan["provenance"]["sparsity"] == 0.4 and len(plan["provenance"]["steps"]) == 2
    # the second cut happened mid-training on both ranks; identical weights after the steps that
    # followed it mean the rebuilt DDP wrapper averaged the new parameters' gradients
    steps = sorted(p.name for p in (tmp_path / "run").rglob("plan_step_*.json"))
    assert steps == ["plan_step_1.json", "plan_step_2.json"]


def test_ddp_bf16_true_lora_trains_with_float32_adapters(tmp_path):
    """bf16-true + LoRA under DDP: the adapters are float32 before DDP builds its gradient buckets (a cast after the
    wrap fails at the first backward), through a mid-training cut and its rebuilt wrapper too."""
    cfg = yaml.safe_load((REPO / "configs" / "debug" / "tiny_ddp.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), precision="bf16-true")
    cfg["trainer"]["callbacks"].append({"class_path": "rank_record.RecordRankState",
                                        "init_args": {"out_dir": str(tmp_path)}})
    cfg["model"].update(recovery="lora", dtype="bfloat16", lora_dropout=0.0)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(config)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["trainable_dtypes"] == ["float32"] and ranks[0]["frozen_dtypes"] == ["bfloat16"]
