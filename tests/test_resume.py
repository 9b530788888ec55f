"""Kill a pruned run with SIGKILL after a checkpoint, resume it: the loss matches the uninterrupted run."""

import csv
import json
import signal
from pathlib import Path

import yaml
from fit_process import REPO, run_fit, run_fits

N = 8  # steps; 16 windows / batch 4 = 4 steps per epoch, so the checkpoint after epoch 0 is at N/2


def _config(tmp_path: Path, name: str, kill: bool, base: str = "tiny.yaml", steps: int = N, checkpoint_at: int = N // 2,
            train_windows: int = 16, pruning: dict | None = None, model: dict | None = None) -> Path:
    """A copy of ``configs/debug/<base>`` that checkpoints at ``checkpoint_at`` (and SIGKILLs itself after it).

    ``pruning``: fields merged into the pruning callback's settings, per section (``{"schedule": {"n_steps": 3}}``).
    """
    cfg = yaml.safe_load((REPO / "configs" / "debug" / base).read_text())
    trainer = cfg["trainer"]
    trainer.update(default_root_dir=str(tmp_path / name), max_steps=steps, limit_val_batches=0, log_every_n_steps=1,
                   enable_checkpointing=True)
    trainer.pop("val_check_interval", None)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if "NirvanaPruning" in c["class_path"]]
    init_args = trainer["callbacks"][0]["init_args"]
    for section, fields in (pruning or {}).items():
        init_args.setdefault(section, {}).update(fields)
    trainer["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                 "init_args": {"save_top_k": -1, "every_n_train_steps": checkpoint_at}})
    if kill:
        trainer["callbacks"].append({"class_path": "kill_after.KillAfterStep", "init_args": {"step": checkpoint_at}})
    cfg["model"].update(model or {})
    cfg["data"].update(max_train_windows=train_windows, batch_size=4)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(metrics: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")}


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    straight, killed = run_fits((_config(tmp_path, "straight", kill=False),), (_config(tmp_path, "killed", kill=True),))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    ckpts = sorted((tmp_path / "killed").rglob("*.ckpt"))
    assert [c.name for c in ckpts] == [f"epoch=0-step={N // 2}.ckpt"]
    resumed = run_fit(_config(tmp_path, "killed", kill=False), f"--ckpt_path={ckpts[0]}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not pruning again" in resumed.stderr + resumed.stdout
    want = _losses(next((tmp_path / "straight").rglob("metrics.csv")))
    got = _losses(sorted((tmp_path / "killed").rglob("version_1/metrics.csv"))[0])
    last = N - 1
    assert last in want and last in got
    assert abs(got[last] - want[last]) <= 1e-6 * abs(want[last]), (got, want)
    for step in range(N // 2, N):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), step


def _iterative_config(tmp_path: Path, name: str, kill: bool) -> Path:
    # cuts at steps 0, 2 and 4; 12 windows / batch 4 = 3 steps per epoch, so the step-3 checkpoint is at an epoch
    # end; full fine-tuning has no dropout, so the resumed run can match bit for bit
    return _config(tmp_path, name, kill, base="tiny_iterative.yaml", steps=6, checkpoint_at=3, train_windows=12,
                   pruning={"schedule": {"every_n_steps": 2, "n_steps": 3}}, model={"recovery": "full"})


def test_resume_mid_schedule_continues_the_schedule(tmp_path):
    straight, killed = run_fits((_iterative_config(tmp_path, "straight", kill=False),),
                                (_iterative_config(tmp_path, "killed", kill=True),))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    ckpt = next((tmp_path / "killed").rglob("*step=3.ckpt"))
    run_dir = ckpt.parents[1]  # .../version_0/checkpoints/x.ckpt
    assert sorted(p.name for p in run_dir.glob("plan_step_*.json")) == ["plan_step_1.json", "plan_step_2.json"]
    resumed = run_fit(_iterative_config(tmp_path, "killed", kill=False), f"--ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stderr + resumed.stdout
    assert "schedule continues" in out and "step 3/3" in out and "step 1/3" not in out
    want_dir = next((tmp_path / "straight").rglob("plan_step_3.json")).parent
    got_dir = next((tmp_path / "killed").rglob("version_1/plan_step_3.json")).parent
    want, got = (json.loads((d / "plan.json").read_text()) for d in (want_dir, got_dir))
    assert got["keep"] == want["keep"]
    assert len(got["provenance"]["steps"]) == 3 and got["provenance"]["steps"][-1]["global_step"] == 4
    want_loss, got_loss = _losses(want_dir / "metrics.csv"), _losses(got_dir / "metrics.csv")
    for step in (3, 4, 5):
        assert abs(got_loss[step] - want_loss[step]) <= 1e-6 * abs(want_loss[step]), step


def test_lora_checkpoint_holds_adapters_only_and_resumes_exactly(tmp_path):
    """A LoRA checkpoint leaves out the frozen base (rebuilt from source + plan): small, and the resumed run
    matches the uninterrupted one."""
    import torch

    lora = {"recovery": "lora", "lora_dropout": 0.0, "lora_r": 4}
    straight, killed = run_fits((_config(tmp_path, "straight", kill=False, model=lora),),
                                (_config(tmp_path, "killed", kill=True, model=lora),))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    ckpt = next((tmp_path / "killed").rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["nirvana_base_omitted"] > 0 and saved["state_dict"]
    assert all("lora_" in k for k in saved["state_dict"]), sorted(saved["state_dict"])[:5]
    resumed = run_fit(_config(tmp_path, "killed", kill=False, model=lora), f"--ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = _losses(next((tmp_path / "straight").rglob("metrics.csv")))
    got = _losses(sorted((tmp_path / "killed").rglob("version_1/metrics.csv"))[0])
    for step in range(N // 2, N):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got, want)
    from nirvana_lightning import NirvanaModule  # outside the CLI too: base rebuilt, adapters loaded

    module = NirvanaModule.load_from_checkpoint(ckpt, weights_only=True)
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved["state_dict"].items())
