"""FSDP2 (Lightning's ModelParallelStrategy) over 2 CPU processes: prune at setup (rank 0 scores, both cut), shard,
train with LoRA, checkpoint sharded, export from the shards, resume from the sharded checkpoint."""

import json
from pathlib import Path

import torch
import yaml
from fit_process import REPO, rank_records, run_fit

STEPS = 4  # 8 windows / (batch 2 x 2 ranks) = 2 steps per epoch: the checkpoint at step 2 ends epoch 0


def _config(tmp_path: Path, name: str) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "debug" / "tiny_fsdp.yaml").read_text())
    trainer = cfg["trainer"]
    trainer.update(default_root_dir=str(tmp_path / name), max_steps=STEPS)
    trainer["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_top_k": -1, "every_n_train_steps": 2}},
        {"class_path": "rank_record.RecordShardedState", "init_args": {"out_dir": str(tmp_path / name)}}]
    cfg["model"]["lora_dropout"] = 0.0  # resume must reproduce the uninterrupted run exactly
    cfg["data"]["max_train_windows"] = 8
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *extra: str) -> list[dict]:
    r = run_fit(config, *extra)
    assert r.returncode == 0, r.stderr[-4000:]
    return rank_records(config.parent / config.stem)


def test_fsdp2_prune_train_export_and_resume(tmp_path):
    from nirvana_lightning import load_pruned

    ranks = _fit(_config(tmp_path, "run"))
    assert ranks[0]["step"] == ranks[1]["step"] == STEPS
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert (ranks[0]["scored"], ranks[1]["scored"]) == (1, 0)  # rank 0 scored, rank 1 cut the broadcast plan
    # only rank 0 read the weights; rank 1 built the model on the meta device and received its shards
    assert (ranks[0]["read_weights"], ranks[1]["read_weights"]) == (True, False)
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the gathered full state is the same on both ranks
    for r in ranks:  # every parameter is a DTensor and each rank holds about half of the model
        assert r["all_dtensor"] and 0.4 < r["local_numel"] / r["global_numel"] < 0.6
    assert ranks[0]["logits"] == ranks[1]["logits"]
    # the export, gathered from the shards and merged, reloaded here (a fresh process) gives the same logits
    export = next((tmp_path / "run").rglob("export"))
    model, _ = load_pruned(export)
    plan = json.loads(next((tmp_path / "run").rglob("plan.json")).read_text())
    assert model.pruning_plan.fingerprint() == ranks[0]["plan"] and plan["provenance"]["sparsity"] == 0.3
    with torch.no_grad():
        got = model(input_ids=torch.tensor(ranks[0]["ids"])).logits
    torch.testing.assert_close(got, torch.tensor(ranks[0]["logits"]), rtol=1e-5, atol=1e-4)
    # sharded checkpoints (a directory per step); resuming from step 2 ends where the uninterrupted run ended
    ckpts = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert [c.name for c in ckpts] == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"] and all(c.is_dir() for c in ckpts)
    resumed = _fit(_config(tmp_path, "resumed"), f"--ckpt_path={ckpts[0]}")
    assert resumed[0]["plan"] == ranks[0]["plan"] and resumed[0]["scored"] == 0  # the plan came from the checkpoint
    assert resumed[0]["weights"] == ranks[0]["weights"]


def test_unsupported_sharding_is_refused_before_loading():
    import pytest
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from nirvana_lightning import LmEvalCallback, RunSummaryCallback
    from nirvana_lightning.errors import ConfigError
    from nirvana_lightning.sharding import check_strategy

    for cls in (FSDPStrategy, DeepSpeedStrategy):  # not constructible without an accelerator / deepspeed here
        with pytest.raises(ConfigError, match=rf"trainer\.strategy='{cls.__name__}'.*ModelParallelStrategy"):
            check_strategy(object.__new__(cls))
    sharded = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    with pytest.raises(ConfigError, match="LmEvalCallback"):
        check_strategy(sharded, [LmEvalCallback(tasks=["nirvana_brown_cloze"])])
    with pytest.raises(ConfigError, match=r"RunSummaryCallback\.speed=True"):
        check_strategy(sharded, [RunSummaryCallback(speed=True)])
    check_strategy(sharded, [RunSummaryCallback(speed=False)])


def test_fsdp2_iterative_schedule_matches_one_process(tmp_path):
    """Pruning during training under FSDP2: shards gathered, LoRA merged, rank 0 scores, both ranks cut, re-shard,
    optimizer rebuilt. Ranks end identical, and both plans equal those of one process seeing the same batches."""
    sharded = _config(tmp_path, "sharded")
    cfg = yaml.safe_load(sharded.read_text())
    pruning = next(c for c in cfg["trainer"]["callbacks"] if "NirvanaPruning" in c["class_path"])["init_args"]
    pruning["target"]["sparsity"] = 0.4
    pruning["schedule"] = {"kind": "linear", "n_steps": 2, "every_n_steps": 2}
    cfg["trainer"]["enable_checkpointing"] = False
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ModelCheckpoint" not in c["class_path"]]
    # 4 windows: every optimizer step sees all of them (2 ranks x 2, or 1 process x 4), so both runs train alike
    cfg["data"]["max_train_windows"] = 4
    cfg["trainer"].update(val_check_interval=None, check_val_every_n_epoch=2)
    sharded.write_text(yaml.safe_dump(cfg))
    ranks = _fit(sharded)
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["plan"] == ranks[1]["plan"]
    assert (ranks[0]["scored"], ranks[1]["scored"]) == (2, 0)
    assert all(r["all_dtensor"] and 0.4 < r["local_numel"] / r["global_numel"] < 0.6 for r in ranks)
    # one process, same global batch (2 ranks x 2 = 4), no sharding: the same two plans
    cfg["trainer"].update(devices=1, strategy="auto", default_root_dir=str(tmp_path / "single"))
    cfg["data"]["batch_size"] = 4
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "rank_record" not in c["class_path"]]
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(cfg))
    r = run_fit(single)
    assert r.returncode == 0, r.stderr[-4000:]
    for k in (1, 2):
        want = json.loads(next((tmp_path / "single").rglob(f"plan_step_{k}.json")).read_text())
        got = json.loads(next((tmp_path / "sharded").rglob(f"plan_step_{k}.json")).read_text())
        assert got["keep"] == want["keep"], k
