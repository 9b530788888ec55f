"""Shared fixtures: tiny random models of every family, one converted SmolLM2 per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# One cache for the whole session (and for CLI subprocesses): the embedded model converts once.
os.environ.setdefault("NIRVANA_CACHE", str(Path(tempfile.gettempdir()) / "nirvana-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from nirvana_lightning.debug_models import CAUSAL_TINY, build_tiny_model  # noqa: E402

FAMILIES = CAUSAL_TINY  # decoder-only families; T5 (encoder-decoder) has tests/test_t5.py
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=["group", "query_head"])
def granularity(request) -> str:
    """Attention granularity: whole KV groups (the paper's), or query heads inside each group too."""
    return request.param


@pytest.fixture
def tiny(family):
    """A fresh tiny random model of the parametrised family."""
    return build_tiny_model(family)


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from nirvana_lightning import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    from nirvana_lightning import load_model

    return load_model("smollm2-135m")
