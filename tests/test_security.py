"""A checkpoint someone sends you must never run code: every loader refuses a malicious pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from nirvana_lightning import NirvanaModule
from nirvana_lightning.io import load_checkpoint


class _Payload:
    """Unpickling this object runs ``os.system`` (a classic pickle exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    # a plausible Lightning checkpoint with the payload inside
    torch.save({"state_dict": {"w": torch.zeros(1)}, "nirvana_pruning_plan": _Payload(marker)}, path)
    return path, marker


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """Guard: the fixture is an actual exploit (so the refusals below mean something)."""
    path, marker = _malicious_checkpoint(tmp_path)
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_code(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="evil.ckpt.*refused") as err:
        load_checkpoint(path)
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


def test_resume_checkpoint_path_refuses_code(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path)
    module = NirvanaModule(source="tiny-llama")
    module.resume_from(path)
    with pytest.raises(ValueError, match="refused"):
        module.build_model()
    assert not marker.exists()


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "random.ckpt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="random.ckpt") as err:
        load_checkpoint(path)
    assert "weights_only=False" not in str(err.value)


def test_plain_checkpoint_still_loads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "nirvana_pruning_plan": {"attention_keep": [[0]]}}, path)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    assert pickle.dumps(ckpt["nirvana_pruning_plan"])  # plain data


@pytest.mark.parametrize("key, value", [("lr", float("inf")), ("lr", float("nan")), ("kd_temperature", float("nan")),
                                        ("kd_temperature", float("inf")), ("weight_decay", float("nan"))])
def test_non_finite_settings_are_refused_by_key(key, value):
    """NaN and inf used to pass the > 0 checks and train to a NaN export (issue 15, item 2)."""
    from nirvana_lightning import ConfigError

    with pytest.raises(ConfigError, match=rf"model\.{key}=.*finite"):
        NirvanaModule(source="tiny-llama", **{key: value})


def _tiny_cli(tmp_path, **model):
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "configs" / "debug" / "tiny.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=4, limit_val_batches=0)
    cfg["trainer"].pop("val_check_interval", None)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "NirvanaPruning" in c["class_path"]]
    cfg["trainer"]["callbacks"].append({"class_path": "nirvana_lightning.ExportCallback",
                                        "init_args": {"path": str(tmp_path / "export")}})
    cfg["model"].update(model)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_exports_nothing(tmp_path):
    proc = _tiny_cli(tmp_path, lr=1.0e30)
    assert proc.returncode != 0
    assert "non-finite" in proc.stderr and "global step" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "export").exists()


def test_save_pruned_refuses_non_finite_weights(tmp_path):
    from nirvana_lightning import save_pruned
    from nirvana_lightning.debug_models import build_tiny_model

    model = build_tiny_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight.*NaN or inf"):
        save_pruned(model, None, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_a_pruned_export_is_a_model_source(tmp_path):
    """Starting from a pruned model (issue 15, item 6): load_model and the CLI read a save_pruned directory."""
    from nirvana_lightning import load_model, load_pruned, load_tokenizer, prune, save_pruned

    model, _ = load_model("tiny-llama")
    calib = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    plan = prune(model, calib, sparsity=0.3, round_to=1)
    source = save_pruned(model, load_tokenizer("tiny-llama"), tmp_path / "pruned", plan)
    again, _ = load_model(str(source))
    ids = calib[:1]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    proc = _tiny_cli(tmp_path, source=str(source))
    assert proc.returncode == 0, proc.stderr[-3000:]
    second, _ = load_pruned(tmp_path / "export")
    assert second.pruning_plan.n_kv_group_before == plan.n_kv_group_after
    assert second.pruning_plan.mlp_dim_before == plan.mlp_dim_after


def test_a_plan_for_another_model_is_refused_naming_both():
    """Same shapes, other family: the plan records its model's identity and cut compares it (item 5)."""
    from nirvana_lightning import cut, make_plan
    from nirvana_lightning.debug_models import build_tiny_model

    llama = build_tiny_model("tiny-llama")
    plan = make_plan(llama, torch.randint(0, 256, (2, 8)), sparsity=0.3)
    mistral = build_tiny_model("tiny-mistral")  # identical parameter names and shapes
    with pytest.raises(ValueError, match=r"made for another model: llama .* applied to mistral"):
        cut(mistral, plan)
    assert mistral.model.layers[0].mlp.up_proj.weight.shape[0] == 128  # untouched
    legacy = type(plan).from_dict({**plan.to_dict(), "provenance": {}})  # a 0.1 plan: no identity recorded
    cut(mistral, legacy)  # shapes alone are checked, as before
    cut(build_tiny_model("tiny-llama"), plan)


def test_ckpt_path_of_another_models_run_is_refused(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    ckpt = tmp_path / "other.ckpt"
    torch.save({"hyper_parameters": {"source": "tiny-qwen2"}, "state_dict": {}}, ckpt)
    proc = subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config",
                           str(repo / "configs" / "debug" / "tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
                           f"--ckpt_path={ckpt}"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ckpt_path=" in proc.stderr and "'tiny-llama'" in proc.stderr and "'tiny-qwen2'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sizes_beyond_the_text_are_refused_before_scoring(tmp_path):
    """Item 3: windows are checked against the text (naming the key and the largest count that fits)."""
    import lightning as L

    from nirvana_lightning import Calibration, ConfigError, NirvanaDataModule, NirvanaPruningCallback

    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 20
                                for i in range(12)))
    dm = NirvanaDataModule(tokenizer="tiny-llama", sources=[str(text)], seq_len=32, val_fraction=0.25)
    dm.setup("fit")
    n_val = dm._probe_stream.numel()
    with pytest.raises(ConfigError, match=rf"probe_samples=500 .*at most {n_val // 64} windows of 64 tokens"):
        dm.probe_windows(500, 64, 0)
    n_cal = dm._calibration_stream.numel()
    with pytest.raises(ConfigError, match=rf"^calibration\.samples=1000 .*at most {n_cal // 16}"):
        dm.calibration_windows(1000, 16, 0)
    # in a fit the count comes from the pruning callback, and the error names its key as the config writes it
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "run",
                        callbacks=[NirvanaPruningCallback(calibration=Calibration(samples=100000, seq_len=16))])
    with pytest.raises(ConfigError,
                       match=rf"^NirvanaPruningCallback\.calibration\.samples=100000 .*at most {n_cal // 16}"):
        trainer.fit(NirvanaModule(source="tiny-llama", recovery="full"), datamodule=dm)
    assert not list((tmp_path / "run").rglob("plan.json"))
    assert dm.calibration_windows(8, 16, 0).shape == (8, 16)


def test_a_probe_whose_log_probs_do_not_fit_in_memory_is_refused():
    from nirvana_lightning import ConfigError
    from nirvana_lightning.pruning.selection import check_logprob_memory

    # 128 x 64 tokens over a 152k vocabulary take 4.6 GiB; half of 4 GiB holds 55 windows of 38.9 MB
    with pytest.raises(ConfigError, match=r"probe_samples=128 .*at most 55: .*4\.6 GiB"):
        check_logprob_memory(128, 64, 151_936, available=4 * 2**30)
    check_logprob_memory(8, 64, 151_936, available=4 * 2**30)


def test_bad_files_and_settings_get_clear_errors(tmp_path):
    """Several classes from issue 15's audit: each now a ConfigError/ValueError naming the key or file."""
    from nirvana_lightning import ConfigError, NirvanaDataModule, NirvanaPruningCallback, load_model, make_plan
    from nirvana_lightning.data import read_records

    empty, binary, broken = tmp_path / "empty.txt", tmp_path / "bin.txt", tmp_path / "broken.jsonl"
    empty.write_text("  \n\n \t\n")
    binary.write_bytes(bytes(range(256)) * 4)
    broken.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(ValueError, match="empty.txt: no text"):
        read_records(str(empty))
    with pytest.raises(ValueError, match="bin.txt: not UTF-8"):
        read_records(str(binary))
    with pytest.raises(ValueError, match=r"broken.jsonl:2: invalid JSON"):
        read_records(str(broken))
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]=.*broken.jsonl:2"):
        NirvanaDataModule(tokenizer="tiny-llama", sources=["brown", str(broken)]).setup("fit")

    model, _ = load_model("tiny-llama")
    assert model.config._name_or_path == "tiny-llama"  # not the user's cache path
    for calib, needle in ((torch.full((2, 8), 10**6), r"ids in \[0, "), (torch.full((2, 8), -1), r"\[-1, -1\]"),
                          (torch.zeros((0, 8), dtype=torch.long), r"shape \(0, 8\)"),
                          (torch.zeros((2, 0), dtype=torch.long), r"shape \(2, 0\)")):
        with pytest.raises(ConfigError, match=needle):
            make_plan(model, calib, sparsity=0.2)

    plan = tmp_path / "plan.json"
    plan.write_text('{"attention_keep": [[0')
    with pytest.raises(ConfigError, match=r"NirvanaPruningCallback\.plan_path=.*plan.json.*valid plan"):
        NirvanaPruningCallback(plan_path=str(plan))
    good = make_plan(model, torch.randint(0, 100, (2, 8)), sparsity=0.2).to_dict()
    good["keep"]["neuron"][0][1] = 1.5
    plan.write_text(json.dumps(good))
    with pytest.raises(ConfigError, match=r"plan_path.*holds 1\.5, not an integer index"):
        NirvanaPruningCallback(plan_path=str(plan))


def test_export_path_that_is_a_file_is_refused_before_training(tmp_path):
    from unittest.mock import MagicMock

    from nirvana_lightning import ConfigError, ExportCallback

    (tmp_path / "export").write_text("not a directory")
    trainer = MagicMock(log_dir=str(tmp_path), world_size=1, global_rank=0)
    module = MagicMock()
    module.hparams = {"recovery": "lora"}
    with pytest.raises(ConfigError, match=r"ExportCallback\.path=.*export.*this is a file"):
        ExportCallback(path="export").setup(trainer, module, "fit")


def test_a_schedule_that_cannot_finish_warns_before_training(tmp_path):
    from unittest.mock import MagicMock

    from nirvana_lightning import NirvanaPruningCallback, PruningTarget, Schedule

    cb = NirvanaPruningCallback(target=PruningTarget(sparsity=0.4),
                                schedule=Schedule(kind="linear", n_steps=4, every_n_steps=10))
    trainer = MagicMock(max_steps=15, max_epochs=None)
    with pytest.warns(UserWarning, match=r"cannot finish: .*max_steps=15 ends the run after 2 of 4 steps, .*0\.200"):
        cb._warn_if_schedule_cannot_finish(trainer)


def test_windows_longer_than_the_context_warn():
    import warnings
    from unittest.mock import MagicMock

    from nirvana_lightning import Calibration, NirvanaPruningCallback

    module = NirvanaModule(source="tiny-llama")
    module.build_model()  # max_position_embeddings 512
    module._trainer = MagicMock(datamodule=MagicMock(seq_len=1024))
    with pytest.warns(UserWarning, match=r"data\.seq_len=1024 exceeds the model's context of 512 positions"):
        module._warn_beyond_context()
    # the calibration windows are the pruning callback's setting, and it warns about them
    with pytest.warns(UserWarning, match=r"NirvanaPruningCallback\.calibration\.seq_len=1024 exceeds the model's "
                                         r"context of 512 positions"):
        NirvanaPruningCallback(calibration=Calibration(seq_len=1024))._warn_beyond_context(module.base_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NirvanaPruningCallback(calibration=Calibration(seq_len=16))._warn_beyond_context(module.base_model)


def test_run_summary_flags_speed_measured_on_a_loaded_machine(monkeypatch):
    from nirvana_lightning.callbacks import summary as summary_mod

    monkeypatch.setattr(summary_mod.os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    monkeypatch.setattr(summary_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    assert summary_mod.machine_load() == {"load": 7.5, "cores": 2}
    table = summary_mod.RunSummaryCallback.render({
        "stages": ["dense", "pruned", "recovered"], "loaded": {"recovered": {"load": 7.5, "cores": 2}},
        "rows": {"decode tokens/s (batch 1, KV cache)": {"dense": 10.0, "pruned": 11.0, "recovered": 78.8},
                 "params (total)": {"dense": 100.0, "recovered": 80.0}}, "plan": None, "speed_settings": None})
    assert "78.8*" in table and "- (loaded)" in table and "recovered 7.5/2" in table
    assert "| 0.800 |" in table  # other rows keep their ratio
