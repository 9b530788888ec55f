"""Exports are atomic and verifiable: one swap, fsync, leftovers cleaned, foreign files kept, sha256 checked."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

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
