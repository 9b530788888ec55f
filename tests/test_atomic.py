"""Exports are atomic and verifiable: one swap, fsync, leftovers cleaned, foreign files kept, sha256 checked."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nirvana_lightning import load_pruned, prune, save_pruned
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.io import MANIFEST, remove_leftovers, verify_manifest, write_dir_atomic

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pruned():
    model = build_tiny_model("tiny-llama")
    plan = prune(model, IDS, sparsity=0.3, round_to=1)
    return model, plan


def test_overwrite_keeps_files_we_did_not_write_and_drops_our_stale_ones(pruned, tmp_path):
    model, plan = pruned
    target = tmp_path / "out"
    save_pruned(model, None, target, plan, quantize="int8_weight_only")
    (target / "notes.txt").write_text("mine")
    (target / "eval").mkdir()
    (target / "eval" / "r.json").write_text("{}")
    save_pruned(model, None, target, plan, overwrite=True)
    names = {p.name for p in target.iterdir()}
    assert {"notes.txt", "eval", "model.safetensors", MANIFEST} <= names
    assert "model_int8.pt" not in names and "quantization.json" not in names  # ours, no longer written
    assert (target / "notes.txt").read_text() == "mine" and (target / "eval" / "r.json").is_file()
    assert "notes.txt" not in json.loads((target / MANIFEST).read_text())["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


def test_user_files_inside_our_directories_survive_an_overwrite(tmp_path):
    target = tmp_path / "out"
    write_dir_atomic(target, lambda t: ((t / "gguf").mkdir(), (t / "gguf" / "model-f16.gguf").write_text("ours")),
                     manifest=True)
    (target / "gguf" / "model-q5.gguf").write_text("the user's")
    os.symlink("/nonexistent/target", target / "dangling")
    write_dir_atomic(target, lambda t: (t / "config.json").write_text("{}"), overwrite=True, manifest=True)
    assert (target / "gguf" / "model-q5.gguf").read_text() == "the user's"
    assert not (target / "gguf" / "model-f16.gguf").exists()  # ours, no longer written
    assert os.path.islink(target / "dangling")
    verify_manifest(target)


def test_without_an_atomic_exchange_a_crash_between_the_renames_loses_nothing(tmp_path, monkeypatch):
    """The documented fallback window: the old export waits under .out.old-<pid>-*; the next save puts it back."""
    import nirvana_lightning.io as io_mod

    target = tmp_path / "out"
    write_dir_atomic(target, lambda t: (t / "v").write_text("old"), manifest=True)
    monkeypatch.setattr(io_mod, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(src, dst)

    monkeypatch.setattr(io_mod.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_dir_atomic(target, lambda t: (t / "v").write_text("new"), overwrite=True, manifest=True)
    monkeypatch.setattr(io_mod.os, "rename", real_rename)
    assert (target / "v").read_text() == "old"  # the writer itself put it back
    # a writer killed for real between the renames (simulated: the old copy aside, under a dead pid)
    os.rename(target, tmp_path / ".out.old-999999-zz")
    with pytest.raises(RuntimeError):
        write_dir_atomic(target, lambda t: (_ for _ in ()).throw(RuntimeError("a failing save")))
    assert (target / "v").read_text() == "old"  # restored before the failing save, which left nothing
    write_dir_atomic(target, lambda t: (t / "v").write_text("new"), overwrite=True, manifest=True)
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_flipped_bytes_in_the_weights_are_caught(pruned, tmp_path):
    model, plan = pruned
    target = save_pruned(model, None, tmp_path / "out", plan)
    weights = target / "model.safetensors"
    card = (target / "README.md").read_text()
    assert json.loads((target / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"] in card
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # inside a tensor: safetensors itself would load it
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its sha256"):
        load_pruned(target)
    loaded, _ = load_pruned(target, verify=False)  # the user's explicit choice
    assert loaded is not None


def test_leftovers_of_dead_writers_are_removed_by_the_next_save(pruned, tmp_path):
    model, plan = pruned
    dead = tmp_path / ".out.tmp-999999-abcd"  # no process 999999
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"0" * 1000)
    old = tmp_path / ".out.old-999998-x"
    old.mkdir()
    mine = tmp_path / f".out.tmp-{os.getpid()}-live"  # a live writer's directory stays
    mine.mkdir()
    save_pruned(model, None, tmp_path / "out", plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", mine.name])
    assert remove_leftovers(tmp_path, "out") == []


def test_a_file_in_the_way_is_refused(pruned, tmp_path):
    model, plan = pruned
    (tmp_path / "out").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_pruned(model, None, tmp_path / "out", plan, overwrite=True)
    assert (tmp_path / "out").read_text() == "x"


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_writing_into_a_mount_point_replaces_only_our_files(pruned, tmp_path):
    model, plan = pruned
    mnt = tmp_path / "volume"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("this sandbox cannot mount a tmpfs")
    try:
        (mnt / "keep.txt").write_text("volume data")
        save_pruned(model, None, mnt, plan, overwrite=True)
        save_pruned(model, None, mnt, plan, overwrite=True, quantize="int8_weight_only")
        names = {p.name for p in mnt.iterdir()}
        assert "keep.txt" in names and "model_int8.pt" in names and "model.safetensors" not in names
        assert not [n for n in names if n.startswith(".")]
        verify_manifest(mnt)
        load_pruned(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


WRITER = r"""
import sys, os
from pathlib import Path
from nirvana_lightning.io import write_dir_atomic

target, n = Path(sys.argv[1]), 0
while True:
    tag = b"AB"[n % 2:n % 2 + 1]
    def write(tmp):
        for i in range(6):
            (tmp / f"part{i}.bin").write_bytes(tag * (1 << 20))
        (tmp / "config.json").write_text('{"tag": "%s"}' % tag.decode())
    write_dir_atomic(target, write, overwrite=True, manifest=True)
    n += 1
    print(n, flush=True)
"""


def test_sigkill_at_random_points_of_a_save_never_leaves_nothing(tmp_path):
    """20 SIGKILLs at random moments of back-to-back overwrites: the destination always holds one complete export."""
    target = tmp_path / "out"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    write_dir_atomic(target, lambda t: (t / "config.json").write_text('{"tag": "0"}'), manifest=True)
    rng = random.Random(0)
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one save completed: the next ones are in flight
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert target.is_dir(), "the destination vanished"
        verify_manifest(target)  # every file complete and the one the manifest names
        tag = json.loads((target / "config.json").read_text())["tag"]
        parts = sorted(target.glob("part*.bin"))
        assert len(parts) == 6 and {p.read_bytes()[:1].decode() for p in parts} == {tag}
    write_dir_atomic(target, lambda t: (t / "config.json").write_text("{}"), overwrite=True, manifest=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "writer.py"]  # leftovers gone


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_a_full_disk_leaves_nothing_half_written(tmp_path):
    """A 1 MiB filesystem (a full disk): the save fails with the OS's ENOSPC and no partial export remains."""
    import errno

    from nirvana_lightning import load_tokenizer

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("this sandbox cannot mount a tmpfs")
    try:
        tok = load_tokenizer("tiny-llama")
        model = build_tiny_model("tiny-llama", vocab_size=len(tok))  # about 25 MB of weights
        with pytest.raises(OSError) as info:
            save_pruned(model, tok, disk / "export")
        assert info.value.errno == errno.ENOSPC and "disk/export" in str(info.value)
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_sigkill_at_random_points_of_a_fit_then_resume_finishes(tmp_path):
    """A fit killed at two random moments after its first checkpoint resumes from last.ckpt to the end."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "configs" / "debug" / "tiny.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=12, limit_val_batches=0,
                          enable_checkpointing=True)
    cfg["trainer"].pop("val_check_interval", None)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "NirvanaPruning" in c["class_path"]]
    cfg["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1, "save_last": True, "save_top_k": 0}})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(config)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    last = tmp_path / "ckpt" / "last.ckpt"
    rng = random.Random(1)
    for _ in range(2):
        proc = subprocess.Popen(cmd + ([f"--ckpt_path={last}"] if last.exists() else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        start = last.stat().st_mtime if last.exists() else 0
        while not (last.exists() and last.stat().st_mtime > start) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before the kill: the kill point proves nothing"
        from nirvana_lightning.io import load_checkpoint

        assert load_checkpoint(last)["global_step"] < 12  # killed mid-run, with a readable last checkpoint
    done = subprocess.run(cmd + [f"--ckpt_path={last}"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    from nirvana_lightning.io import load_checkpoint

    assert load_checkpoint(last)["global_step"] == 12
