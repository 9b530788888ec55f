"""Model loading: embedded conversion is cached and atomic; bad sources list what is accepted."""

import pytest

from nirvana_lightning import loading
from nirvana_lightning.errors import ConfigError


def test_unknown_source_lists_what_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match="model.source='smollm3'.*smollm2-135m.*tiny-llama.*hub id"):
        loading.validate_source("smollm3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        loading.validate_source(str(tmp_path / "empty"))
    loading.validate_source("meta-llama/Llama-3.1-8B")  # hub ids pass without network
    with pytest.raises(ConfigError, match="model.dtype='fp8'"):
        loading.load_model("tiny-llama", dtype="fp8")


def test_embedded_conversion_is_cached(smollm2, monkeypatch):
    target = loading.convert_embedded("smollm2-135m")
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert "quantization_config" not in (target / "config.json").read_text()
    import transformers

    def must_not_run(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_run)
    assert loading.convert_embedded("smollm2-135m") == target  # second call: no conversion


def test_conversion_failure_leaves_nothing(tmp_path, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        loading.convert_embedded("smollm2-135m", cache_dir=tmp_path)
    assert list((tmp_path / "embedded").iterdir()) == []  # no target, no temporary leftovers


def test_smollm2_is_the_real_model(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
