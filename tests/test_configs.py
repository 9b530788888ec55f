"""Every YAML under configs/ parses and instantiates (models load lazily, so nothing is downloaded)."""

from pathlib import Path

import pytest

from nirvana_lightning.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "tiny.yaml", "llama-3.1-8b-lora.yaml", "qwen2.5-7b-lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_instantiates(path, monkeypatch):
    import sys

    import torch

    monkeypatch.setattr(sys, "argv", ["nirvana_lightning"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GPU configs instantiate on CPU CI
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cli = main(["--config", str(path)], run=False)
    assert cli.model.model is None  # nothing loaded at instantiation
    assert cli.datamodule.tokenizer_source == cli.model.hparams.source
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "each config starts with a header comment (purpose and command)"
