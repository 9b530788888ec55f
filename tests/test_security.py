"""A checkpoint someone sends you must never run code: every loader refuses a malicious pickle."""

from __future__ import annotations

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
    module.resume_ckpt_path = str(path)
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
