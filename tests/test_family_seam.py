"""Families declare, the core reads: no Hugging Face attribute or config name outside ``families/``.

Every ``.py`` under ``nirvana_lightning/`` outside ``families/`` is read with ``ast``: attribute accesses,
names, keywords, and string constants (``getattr(config, "vocab_size")``, state-dict keys, messages) count;
docstrings and comments do not. What a family declares is asked of the family (``family.vocab_size``,
``family.max_sequence_length``, ``family.carries_output_biases(config)``, ...). Each remaining use is in
:data:`ALLOW` with its reason.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nirvana_lightning"

HF_NAMES = frozenset("""
    q_proj k_proj v_proj o_proj gate_proj up_proj down_proj qkv_proj gate_up_proj embed_tokens lm_head self_attn
    hidden_size num_hidden_layers vocab_size num_attention_heads num_key_value_heads intermediate_size
    max_position_embeddings attention_bias mlp_bias is_encoder_decoder d_ff d_model d_kv wi_0 wi_1
    tie_word_embeddings final_logit_softcapping
""".split())
_WORD = re.compile(r"\b(" + "|".join(sorted(HF_NAMES)) + r")\b")

#: (file under nirvana_lightning/, name): why it may stay
ALLOW: dict[tuple[str, str], str] = {
    ("debug_models.py", "is_encoder_decoder"): "families layer: the family class's own declaration",
    ("debug_models.py", "vocab_size"): "families layer: builds the tiny HF configs the families declare",
    ("loading.py", "vocab_size"): "keyword of debug_models.build_tiny_model (an HF config field it sets)",
    ("eval/speed.py", "lm_head"): "flops_per_token's public result key for the head's share, not an attribute",
    ("serving/gguf_export.py", "self_attn"): "GGUF conversion: the q/k norms llama.cpp needs (no family accessor)",
    ("serving/gguf_export.py", "hidden_size"): "a plan's model_identity key, written by pruning/surgery.py",
    ("serving/vllm_models.py", "num_attention_heads"): "vLLM conversion: vLLM's layers read HF config fields",
    ("serving/vllm_models.py", "num_key_value_heads"): "vLLM conversion: vLLM's layers read HF config fields",
    ("serving/vllm_models.py", "intermediate_size"): "vLLM conversion: vLLM's layers read HF config fields",
    ("serving/vllm_models.py", "num_hidden_layers"): "vLLM conversion: vLLM's layers read HF config fields",
    ("serving/vllm_models.py", "attention_bias"): "vLLM conversion: Qwen2 built by vLLM's Llama layer (q/k/v bias)",
    # the pruning core: compatibility with saved plans
    ("pruning/plan.py", "self_attn"): "a 0.2 plan file's kind name, read and renamed (LEGACY_KINDS)",
    ("pruning/surgery.py", "hidden_size"): "model_identity's recorded fields: every saved plan carries them as 0.1 wrote",
    ("pruning/surgery.py", "num_hidden_layers"): "model_identity's recorded fields: every saved plan carries them",
    ("pruning/surgery.py", "vocab_size"): "model_identity's recorded fields: every saved plan carries them",
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _asks_the_family(node: ast.AST) -> bool:
    """``family.x`` / ``get_family(m).x``: a family declaration, not an HF name."""
    if isinstance(node, ast.Name):
        return "family" in node.id
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "get_family"


def uses(path: Path) -> list[tuple[int, str]]:
    """``(line, name)`` of every Hugging Face name the module's code uses."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            if not _asks_the_family(node.value):
                names = [node.attr]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.keyword) and node.arg:
            names = [node.arg]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            names = _WORD.findall(node.value)
        found += [(node.lineno, n) for n in names if n in HF_NAMES]
    return sorted(set(found))


def _files() -> list[Path]:
    return sorted(f for f in PACKAGE.rglob("*.py") if f.relative_to(PACKAGE).parts[0] != "families")


def test_no_hugging_face_name_outside_families():
    bad = []
    for f in _files():
        rel = f.relative_to(PACKAGE).as_posix()
        bad += [f"nirvana_lightning/{rel}:{line}: {name}" for line, name in uses(f) if (rel, name) not in ALLOW]
    assert bad == [], "Hugging Face names outside families/ (ask the family, or allow-list with a reason):\n" \
        + "\n".join(bad)


def test_every_allowance_is_used_and_justified():
    used = {(f.relative_to(PACKAGE).as_posix(), name) for f in _files() for _, name in uses(f)}
    stale = sorted(set(ALLOW) - used)
    assert stale == [], f"allow-list entries no longer needed: {stale}"
    assert all(reason.strip() for reason in ALLOW.values())


def test_the_reader_sees_code_not_prose(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Mentions q_proj in a docstring."""\n'
                      'x = model.config.vocab_size  # lm_head in a comment\n'
                      'y = getattr(config, "mlp_bias", False)\n'
                      'z = family.lm_head()\n')
    assert uses(sample) == [(2, "vocab_size"), (3, "mlp_bias")]


def test_the_standalone_modeling_file_rebuilds_every_family_from_the_config():
    """``families/remote_modeling.py`` imports only torch and transformers and names no family's attributes: a cut
    records every changed module's shape and attribute in ``config.nirvana_layer_modules``, and the reload class
    built from that config alone has the cut model's parameter shapes, for every decoder family."""
    from nirvana_lightning import prune
    from nirvana_lightning.debug_models import CAUSAL_TINY, build_tiny_model
    from nirvana_lightning.families import remote_modeling

    for name in CAUSAL_TINY:
        model = build_tiny_model(name)
        prune(model, None, sparsity=0.4, criterion="magnitude", attention_granularity="query_head")
        rebuilt = remote_modeling.pruned_class(model.config.model_type)(model.config)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
            {k: v.shape for k, v in model.state_dict().items()}, name


def test_the_legacy_layout_names_what_the_llama_layout_families_declare():
    """0.2 exports carry widths only; their reload reads ``LEGACY_LAYOUT``, which must name the projections of the
    families 0.2 exported (the Llama layout)."""
    from nirvana_lightning.families import FAMILIES, remote_modeling

    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"):
        names = {path.split(".")[-1] for path in remote_modeling.LEGACY_LAYOUT}
        assert names == set(FAMILIES[model_type].role_names.values()), model_type
