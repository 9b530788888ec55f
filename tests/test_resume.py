"""Kill a pruned run with SIGKILL after a checkpoint, resume it: the loss matches the uninterrupted run."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
N = 8  # steps; 16 windows / batch 4 = 4 steps per epoch, so the checkpoint after epoch 0 is at N/2


def _config(tmp_path: Path, name: str, kill: bool) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "debug" / "tiny.yaml").read_text())
    trainer = cfg["trainer"]
    trainer.update(default_root_dir=str(tmp_path / name), max_steps=N, limit_val_batches=0, log_every_n_steps=1,
                   enable_checkpointing=True)
    trainer.pop("val_check_interval", None)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if "NirvanaPruning" in c["class_path"]]
    trainer["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                 "init_args": {"save_top_k": -1, "every_n_train_steps": N // 2}})
    if kill:
        trainer["callbacks"].append({"class_path": "kill_after.KillAfterStep", "init_args": {"step": N // 2}})
    cfg["data"].update(max_train_windows=16, batch_size=4)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(config), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(metrics: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")}


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    straight = _fit(_config(tmp_path, "straight", kill=False))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _fit(_config(tmp_path, "killed", kill=True))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    ckpts = sorted((tmp_path / "killed").rglob("*.ckpt"))
    assert [c.name for c in ckpts] == [f"epoch=0-step={N // 2}.ckpt"]
    resumed = _fit(_config(tmp_path, "killed", kill=False), f"--ckpt_path={ckpts[0]}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not pruning again" in resumed.stderr + resumed.stdout
    want = _losses(next((tmp_path / "straight").rglob("metrics.csv")))
    got = _losses(sorted((tmp_path / "killed").rglob("version_1/metrics.csv"))[0])
    last = N - 1
    assert last in want and last in got
    assert abs(got[last] - want[last]) <= 1e-6 * abs(want[last]), (got, want)
    for step in range(N // 2, N):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), step
