"""Two CPU processes (gloo DDP): both ranks cut the same plans (at setup and mid-training) and hold
identical weights after training."""

import json
from pathlib import Path

import yaml
from fit_process import REPO, rank_records, run_fit


def _ddp_run(tmp_path: Path, trainer: dict | None = None, model: dict | None = None,
             target: dict | None = None) -> tuple[dict, list[dict]]:
    """``configs/debug/tiny_ddp.yaml`` (with changes) in 2 processes; each rank's recorded state."""
    cfg = yaml.safe_load((REPO / "configs" / "debug" / "tiny_ddp.yaml").read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"].endswith("NirvanaPruningCallback"):
            callback["init_args"]["target"].update(target or {})
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), **(trainer or {}))
    cfg["trainer"]["callbacks"].append({"class_path": "rank_record.RecordRankState",
                                        "init_args": {"out_dir": str(tmp_path)}})
    cfg["model"].update(model or {})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = run_fit(config, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, rank_records(tmp_path)


def test_two_process_ddp_same_plan_and_weights(tmp_path):
    cfg, ranks = _ddp_run(tmp_path)
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
    wrap fails at the first backward), through a mid-training cut and its rebuilt wrapper too. On Gemma 3 with
    query heads pruned inside KV groups (another family and granularity than the first test)."""
    _, ranks = _ddp_run(tmp_path, trainer={"precision": "bf16-true"},
                        model={"source": "tiny-gemma3", "recovery": "lora", "dtype": "bfloat16", "lora_dropout": 0.0},
                        target={"attention_granularity": "query_head"})
    plan = json.loads(next((tmp_path / "run").rglob("plan.json")).read_text())
    assert set(plan["keep"]) == {"kv_group", "q_head", "neuron"} and len(plan["provenance"]["steps"]) == 2
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["trainable_dtypes"] == ["float32"] and ranks[0]["frozen_dtypes"] == ["bfloat16"]
