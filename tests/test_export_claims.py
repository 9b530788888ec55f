"""What an export claims is what it is, and a late failure never loses the trained model (issue 25):
weight files readable like the others, int8 counted from the file, engines named only where they load it,
save_gguf's leftovers removed after a kill, and the fit-end fallback export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nirvana_lightning import load_pruned, load_tokenizer, prune, save_gguf, save_pruned
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.io import file_mode

IDS = torch.arange(1, 17).reshape(2, 8) * 37 % 256  # inside every tiny vocabulary (256 without a tokenizer)


def test_every_export_file_gets_the_umask_mode(tmp_path):
    """safetensors writes its shard with mkstemp (0600): a serving account could not read the weights."""
    model = build_tiny_model("tiny-llama")
    save_pruned(model, load_tokenizer("tiny-llama"), tmp_path / "m", prune(model, IDS, sparsity=0.3))
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir() if p.is_file()}
    assert modes["model.safetensors"] == file_mode(), modes
    assert set(modes.values()) == {file_mode()}, modes


@pytest.mark.parametrize("name, per_layer", [("tiny-llama", 7), ("tiny-t5", None)])
def test_int8_export_quantises_and_counts_the_block_weights(tmp_path, name, per_layer):
    """T5's blocks are not `.layers.`: its int8 export quantised nothing while quantization.json said int8."""
    pytest.importorskip("torchao")
    from nirvana_lightning.families import get_family
    from nirvana_lightning.serving.quantize import block_linear_names

    model = build_tiny_model(name)
    expected = len(block_linear_names(model))
    assert expected > 0
    if per_layer:
        assert expected == per_layer * len(get_family(model).layers())
    save_pruned(model, None, tmp_path / "m", None, quantize="int8_weight_only")
    info = json.loads((tmp_path / "m" / "quantization.json").read_text())
    assert info["quantized_tensors"] == expected
    state = torch.load(tmp_path / "m" / info["weights"], weights_only=True)
    int8 = [k for k, t in state.items() if type(t) is not torch.Tensor]
    assert len(int8) == expected and all(k.rsplit(".", 1)[0] in block_linear_names(model) for k in int8)
    reloaded, _ = load_pruned(tmp_path / "m")
    assert sum(type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor
               for p in reloaded.parameters()) == expected


@pytest.mark.parametrize("name, vllm, gguf", [("tiny-llama", True, True), ("tiny-gemma3", False, None),
                                              ("tiny-t5", False, False)])
def test_card_names_only_engines_that_load_the_export(tmp_path, name, vllm, gguf):
    from nirvana_lightning.serving import VLLM_FAMILIES

    model = build_tiny_model(name)
    assert (model.config.model_type in VLLM_FAMILIES) == vllm
    save_pruned(model, None, tmp_path / "m", None)
    card = (tmp_path / "m" / "README.md").read_text()
    assert ("vllm serve" in card) == vllm, card
    if gguf is True:
        assert "save_gguf" in card and "no GGUF" not in card


def test_save_gguf_refuses_another_models_plan(tmp_path):
    from nirvana_lightning.errors import ConfigError

    tok = load_tokenizer("tiny-llama")
    model = build_tiny_model("tiny-llama", vocab_size=len(tok))
    plan = prune(model, None, sparsity=0.3, criterion="magnitude", allocation="uniform")
    other = build_tiny_model("tiny-llama", vocab_size=len(tok))
    other_plan = prune(other, None, sparsity=0.6, criterion="magnitude", allocation="uniform")
    with pytest.raises(ConfigError, match="the plan this model was cut with"):
        save_gguf(model, tok, tmp_path / "m.gguf", other_plan)
    assert not list(tmp_path.iterdir())
    save_gguf(model, tok, tmp_path / "m.gguf", plan)  # its own plan: written, fingerprint recorded
    import gguf

    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    recorded = bytes(fields["nirvana.plan_fingerprint"].parts[-1]).decode()
    assert recorded == plan.fingerprint()


KILLED_GGUF = r"""
import os, signal, sys
import gguf
from nirvana_lightning import load_tokenizer, save_gguf
from nirvana_lightning.debug_models import build_tiny_model

def die(self, *args, **kwargs):  # the header is on disk, the tensors are not: SIGKILL now
    os.kill(os.getpid(), signal.SIGKILL)

gguf.GGUFWriter.write_tensors_to_file = die
tok = load_tokenizer("tiny-llama")
save_gguf(build_tiny_model("tiny-llama", vocab_size=len(tok)), tok, sys.argv[1])
"""


def test_a_killed_save_gguf_leaves_no_file_and_its_leftover_is_removed(tmp_path):
    target = tmp_path / "model.gguf"
    proc = subprocess.run([sys.executable, "-c", KILLED_GGUF, str(target)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not target.exists() and len(leftovers) == 1 and leftovers[0].startswith(".model.gguf.tmp-"), leftovers
    tok = load_tokenizer("tiny-llama")
    save_gguf(build_tiny_model("tiny-llama", vocab_size=len(tok)), tok, target, modelfile=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # the dead writer's file is gone
    assert target.stat().st_mode & 0o777 == file_mode()


def test_a_late_export_failure_saves_the_trained_model_first(tmp_path, monkeypatch):
    """The GGUF writer fails at fit end (a full disk, say): the trained weights go to a fallback export named in
    the error, and they are the trained model's (reloaded logits equal the in-memory model's)."""
    import lightning as L

    import nirvana_lightning.callbacks.export as export_callback
    from nirvana_lightning import ExportCallback, NirvanaModule
    from nirvana_lightning.data import NirvanaDataModule

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_callback, "save_gguf", full_disk)
    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery="full", lr=1e-2, warmup_steps=1)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=16, max_val_windows=2, batch_size=2)
    export = ExportCallback(path=str(tmp_path / "export"), format=["hf", "gguf"])
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[export])
    with pytest.raises(RuntimeError, match=r"export to .*export failed \(OSError.*saved to .*export\.fallback-"):
        trainer.fit(module, datamodule=data)
    assert not (tmp_path / "export").exists()
    fallback = export.fallback
    assert fallback is not None and fallback.parent == tmp_path and fallback.name.startswith("export.fallback-")
    reloaded, _ = load_pruned(fallback)
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, module.model(input_ids=IDS).logits)
    assert not export._lock, "the destination's lock is released when the fit ends"


def test_the_destination_lock_is_held_only_while_the_process_lives(tmp_path):
    """The claim is an flock: a SIGKILLed holder's lock is gone (a stale lock file never blocks anyone)."""
    from nirvana_lightning.io import PathLock, PathLocked

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom nirvana_lightning.io import PathLock\n"
                               "PathLock(sys.argv[1]).acquire(wait=False); print('held', flush=True); time.sleep(600)",
                               str(tmp_path / "export")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PathLocked, match=rf"claimed by another running process \(pid {holder.pid}"):
            PathLock(tmp_path / "export").acquire(wait=False)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=900)
    with PathLock(tmp_path / "export").acquire(wait=False) as lock:
        assert lock.held
    assert not Path(tmp_path / ".export.lock").exists()  # released: the lock file is removed


def test_an_export_to_a_read_only_place_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """Root may write almost anywhere, so a read-only place here is sysfs (EACCES even for root on these machines);
    the CLI table has the portable case (a destination under a regular file)."""
    from nirvana_lightning.cli import entry

    probe = Path("/sys/nirvana-write-probe")
    try:
        probe.mkdir()
        probe.rmdir()
        pytest.skip("/sys is writable on this machine")
    except OSError:
        pass
    config = tmp_path / "export.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: nirvana_lightning.ExportCallback\n"
                      "      init_args:\n        path: /sys/nirvana-export/export\n")
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit) as info:
        entry(["fit", "--config", str(repo / "configs" / "debug" / "tiny.yaml"), "--config", str(config),
               f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("nirvana-lightning: error: ExportCallback.path='/sys/nirvana-export/export' is invalid; "
                           "expected a writable location"), last
    assert not list((tmp_path / "run").rglob("plan.json"))
