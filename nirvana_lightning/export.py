"""On-disk format of a pruned model: a standard Hugging Face directory that reloads anywhere.

Layout written by :func:`save_pruned`::

    config.json             stock config + nirvana_layer_widths + head_dim + auto_map
    model.safetensors       sliced weights (LoRA merged unless adapter_only)
    modeling_nirvana.py     standalone classes for trust_remote_code loading
    plan.json               the pruning plan with provenance
    generation_config.json, tokenizer files, README.md (model card with provenance)
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError, check_choice
from .families import FAMILIES, get_family, remote_modeling, unwrap_model
from .io import MANIFEST, sha256_written, verify_manifest, write_dir_atomic
from .pruning import PruningPlan, count_parameters
from .pruning.plan import library_versions

REMOTE_FILE = "modeling_nirvana.py"
PLAN_FILE = "plan.json"
BASE_FILE = "nirvana_base.json"
SERVING_FILE = "serving.json"


def _serving_report(model: nn.Module) -> dict[str, Any]:
    """Which engines and settings the per-layer widths fit (see :mod:`nirvana_lightning.serving.constraints`)."""
    from .serving.constraints import serving_constraints
    from .serving.gguf_export import _layer_widths

    heads, kv_heads, ffn, _ = _layer_widths(model)
    report = serving_constraints(model.config.model_type, heads, kv_heads, ffn)
    if get_family(model).has_mlp_biases:  # bias compensation: save_gguf refuses MLP biases
        report["gguf_architecture"] = "refused"
        report["broken"].append("GGUF: the model has MLP biases (bias compensation); serve it with vLLM or transformers")
    return report


def _engine_lines(model: nn.Module) -> list[str]:
    """What the card says about serving engines: only what the plugin registers and the GGUF writer accepts."""
    from .errors import ConfigError
    from .serving import VLLM_FAMILIES
    from .serving.gguf_export import gguf_architecture

    model_type = model.config.model_type
    if model_type in VLLM_FAMILIES:
        out = ["Serve it with vLLM where nirvana-lightning is installed (its plugin registers the architecture):",
               "`vllm serve <path>`."]
    else:
        out = [f"vLLM: no path for model_type {model_type!r} (nirvana-lightning's plugin registers "
               f"{', '.join(VLLM_FAMILIES)}); serve it with transformers."]
    try:
        arch = gguf_architecture(model)
        out.append(f"llama.cpp / Ollama: write a GGUF (`{arch}` graph) with `nirvana_lightning.save_gguf`.")
    except ConfigError as err:
        out.append(f"llama.cpp / Ollama: no GGUF for this model ({err.expected}).")
    return out


def _model_card(model: nn.Module, plan: PruningPlan | None, extra: dict[str, Any]) -> str:
    p = plan.provenance if plan is not None else {}
    family = get_family(model)
    counts = count_parameters(model, family)
    lines = [
        "---", "library_name: transformers", "tags: [pruned, nirvana-lightning, structured-pruning]", "---", "",
        "# Structurally pruned model (nirvana-lightning)", "",
        "Pruned with NIRVANA-style structured pruning: " + family.pruned_units_text,
    ]
    if extra.get("quantize"):
        lines += [f"Weights quantised with torchao ({extra['quantize']}, `model_int8.pt`): load with "
                  "`nirvana_lightning.load_pruned(path)` (executes no code from this directory); vLLM and "
                  "`trust_remote_code` read the float export only.", ""]
    else:
        lines += [
            f"Reload without nirvana-lightning: `{family.auto_class_name}.from_pretrained(path, trust_remote_code=True)`;",
            "with it: `nirvana_lightning.load_pruned(path)` (executes no code from this directory)."]
        lines += (_engine_lines(model) + [""]) if family.servable else [
            "No serving engine path (vLLM plugin, GGUF) exists for this family here: serve it with transformers.", ""]
    lines += [
        "| field | value |", "|---|---|",
    ]
    rows = {
        "base model": extra.get("base_model") or p.get("model_source"),
        "model type": model.config.model_type,
        "criterion": p.get("criterion"), "functional": p.get("functional"),
        "target sparsity": p.get("sparsity"), "gamma": p.get("gamma"), "round_to": p.get("round_to"),
        "realised block-weight sparsity": plan.realised_sparsity if plan else None,
        "calibration fingerprint": p.get("calibration_fingerprint"),
        "calibration selection": (
            f"KL, candidate {p['selection']['best_index']} of {len(p['selection']['kls'])} "
            f"(KL {min(p['selection']['kls']):.5f})" if p.get("selection") else None),
        "params before": p.get("params_before"), "params after": counts["total"],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    for key, value in {**rows, **{f"metric {k}": v for k, v in (extra.get("metrics") or {}).items()}}.items():
        if value is not None:
            lines.append(f"| {key} | {value} |")
    lines += ["", "Library versions: `" + json.dumps(library_versions()) + "`", ""]
    if plan is not None:
        lines += ["## Per-layer widths", "", plan.table(), ""]
    if extra.get("weights"):
        lines += ["## Files", "", "| weight file | sha256 |", "|---|---|"]
        lines += [f"| {name} | `{digest}` |" for name, digest in extra["weights"].items()]
        lines += ["", "Every file's size and sha256 is in `nirvana_files.json`; `load_pruned` checks the weights "
                  "against it (`verify=False` skips this).", ""]
    serving = extra.get("serving")
    if serving is not None:
        vllm = ("- vLLM: `vllm serve <path>` with nirvana-lightning installed (its plugin registers the architecture)"
                f"; tensor parallelism up to {serving['max_tp_size']}.") if serving.get("vllm") \
            else "- vLLM: not available for this model type (see below)."
        gguf = serving["gguf_architecture"]
        gguf = (f"- llama.cpp / Ollama: GGUF architecture `{gguf}` (`nirvana_lightning.save_gguf`)."
                if gguf not in ("not supported", "refused") else f"- llama.cpp / Ollama: GGUF {gguf} (see below).")
        lines += ["## Serving", "", vllm, gguf, ""]
        if serving["broken"]:
            lines += ["Constraints this model breaks:", ""] + [f"- {b}" for b in serving["broken"]] + [""]
    return "\n".join(lines)


def save_pruned(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    plan: PruningPlan | None = None,
    *,
    overwrite: bool = False,
    adapter_only: bool = False,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    quantize: str | None = None,
    into: str | Path | None = None,
) -> Path:
    """Write a pruned model as a Hugging Face directory, atomically.

    Args:
        model: the pruned model (plain transformers or peft-wrapped).
        tokenizer: saved next to the weights (may be None).
        path: destination directory; an existing non-empty one is refused unless ``overwrite``.
        plan: the plan that produced the model (``plan.json`` and the model card).
        adapter_only: for a peft model, write only the adapter + plan + base reference
            (``nirvana_base.json``); otherwise LoRA adapters are merged into a plain model that shares
            every untouched tensor with ``model`` (:func:`~nirvana_lightning.recovery.lora.merged_model`).
        base_model: source of the dense model, recorded in the card and the base reference.
        metrics: numbers to put in the model card.
        quantize: ``int8_weight_only`` writes the decoder's linear weights as torchao int8 tensors
            (``model_int8.pt``, per-channel scales; a quantised copy, the model is untouched) instead of
            ``model.safetensors``. :func:`load_pruned` reloads it (``weights_only``); vLLM and remote-code
            loading read the float export only.
        into: write the files into this existing (temporary) directory instead, with no swap and no
            manifest: for callers that add files and then swap everything at once (``ExportCallback``).

    Returns:
        ``path``. On any failure nothing exists at ``path`` (or the old content is kept).
    """
    if quantize is not None:
        from .serving.quantize import METHODS

        check_choice("save_pruned: quantize", quantize, METHODS)
        if adapter_only:
            raise ValueError("adapter_only=True and quantize cannot be combined: the adapter needs the float base")
    is_peft = unwrap_model(model) is not model
    base = unwrap_model(model)
    source = base_model or (plan.provenance.get("model_source") if plan else None) or base.config._name_or_path
    if adapter_only and not is_peft:
        raise ValueError("adapter_only=True needs a peft-wrapped model")
    if adapter_only and plan is None:
        raise ValueError("adapter_only=True needs the plan: the adapter only fits the pruned shapes")
    if adapter_only and plan.provenance.get("bias_compensation"):
        raise ValueError("adapter_only=True with bias compensation: the compensated biases are part of the base, which "
                         "an adapter-only export rebuilds from source + plan without them; export the merged model")

    def write(tmp: Path) -> None:
        from .recovery.lora import merged_model  # (recovery imports Lightning; this module must not)

        if adapter_only:
            model.save_pretrained(tmp)
            dtype = str(next(base.parameters()).dtype).replace("torch.", "")
            (tmp / BASE_FILE).write_text(json.dumps({"base_model": source, "dtype": dtype}, indent=1))
        else:
            merged = merged_model(model) if is_peft else base  # no copy of the model (recovery.lora)
            get_family(merged)  # supported family
            for name, param in merged.named_parameters():
                if not bool(param.detach().isfinite().all()):
                    raise ValueError(f"save_pruned: parameter {name} holds NaN or inf values; refusing to export a "
                                     "broken model (nothing was written)")
            config = merged.config
            previous = getattr(config, "auto_map", None), getattr(config, "architectures", None)
            cls_name = remote_modeling.pruned_class(config.model_type).__name__
            # transformers with trust_remote_code follows auto_map; vLLM (with our plugin installed) follows
            # architectures, which names the class the plugin registers (the same name as ours here).
            auto = get_family(merged).auto_class_name
            config.auto_map = {auto: f"modeling_nirvana.{cls_name}"}
            try:
                if quantize is None:
                    merged.save_pretrained(tmp, safe_serialization=True)
                else:
                    _save_quantized(merged, tmp, quantize)
            finally:
                if previous[0] is None:
                    del config.auto_map
                else:
                    config.auto_map = previous[0]
                config.architectures = previous[1]
            written = json.loads((tmp / "config.json").read_text())
            written["architectures"] = [cls_name]  # save_pretrained writes the stock class name
            serving = None
            if quantize is None:
                shutil.copyfile(remote_modeling.__file__, tmp / REMOTE_FILE)
                if get_family(merged).servable:  # no serving engine path for encoder-decoders (transformers only)
                    serving = _serving_report(merged)
                    (tmp / SERVING_FILE).write_text(json.dumps(serving, indent=1) + "\n")
            else:  # torchao weights: neither remote code nor vLLM reads them, so do not point there
                written.pop("auto_map", None)
            (tmp / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
            weights = {f.name: sha256_written(f) for f in sorted(tmp.iterdir()) if f.suffix in (".safetensors", ".pt")}
            (tmp / "README.md").write_text(_model_card(merged, plan, {"base_model": source, "metrics": metrics,
                                                                      "serving": serving, "quantize": quantize,
                                                                      "weights": weights}))
        if plan is not None:
            (tmp / PLAN_FILE).write_text(plan.to_json())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    if into is not None:  # a caller that writes more files runs the one atomic swap itself (ExportCallback)
        write(Path(into))
        return Path(into)
    return write_dir_atomic(path, write, overwrite=overwrite, manifest=True)


def _save_quantized(model: nn.Module, tmp: Path, method: str) -> None:
    """config.json, generation_config.json and the torchao state dict of a quantised copy of ``model``."""
    import torch

    from .serving.quantize import INT8_WEIGHTS, QUANT_FILE, block_linear_names, quantize_int8

    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    quantized = copy.deepcopy(model)
    n_quantized = len(block_linear_names(quantized))
    quantize_int8(quantized)
    state = quantized.state_dict()
    # what the file holds, counted from it (not what was asked): torchao's int8 tensors are subclasses
    n_int8 = sum(1 for t in state.values() if type(t) is not torch.Tensor and "int8" in repr(type(t)).lower()
                 or getattr(t, "dtype", None) == torch.int8)
    if n_int8 != n_quantized:
        raise ValueError(f"int8 export: {n_quantized} block linear weights were to be quantised, the state dict "
                         f"holds {n_int8} int8 tensors")
    torch.save(state, tmp / INT8_WEIGHTS)
    from importlib.metadata import version

    (tmp / QUANT_FILE).write_text(json.dumps({"method": method, "library": "torchao",
                                              "torchao": version("torchao"), "weights": INT8_WEIGHTS,
                                              "quantized_tensors": n_int8}, indent=1))


def _load_quantized(cls, path: Path, config, dtype):
    from .io import load_checkpoint
    from .serving.quantize import INT8_WEIGHTS, QUANT_FILE, quantize_int8

    try:
        info = json.loads((path / QUANT_FILE).read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"{path / QUANT_FILE} is not readable JSON: {err}") from None
    saved = str(getattr(config, "dtype", "float32")).replace("torch.", "")
    if dtype is not None and str(dtype).replace("torch.", "") != saved:
        raise ConfigError("load_pruned: dtype", str(dtype).replace("torch.", ""),
                          f"None or {saved!r} for an int8 export (its float parts stay as saved)")
    if info.get("method") != "int8_weight_only":
        raise ValueError(f"{path / QUANT_FILE}: quantisation method {info.get('method')!r}; this version reads "
                         "'int8_weight_only'")
    model = cls(config)  # pruned shapes from the config (buffers such as RoPE's are built here)
    quantize_int8(model)
    state = load_checkpoint(path / INT8_WEIGHTS, mmap=False)  # weights_only: torchao tensors are allow-listed
    result = model.load_state_dict(state, assign=True, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path / INT8_WEIGHTS} does not match the config: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    return model


def _check_plan_against_config(plan: PruningPlan, config) -> None:
    widths = getattr(config, remote_modeling.WIDTHS_KEY, None)
    if widths is None:
        return
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError("model_type", config.model_type, sorted(FAMILIES))
    family.check_plan_widths(plan, widths)


def load_pruned(path: str | Path, dtype: str | None = None, *, verify: bool = True):
    """Load a directory written by :func:`save_pruned` with the stock transformers class.

    No code from the directory is executed: the classes come from this package.

    Args:
        path: the exported directory.
        dtype: ``float32`` / ``bfloat16`` / ``float16``; default: as saved.
        verify: check the weight files, ``config.json`` and ``plan.json`` against the sha256 in
            ``nirvana_files.json`` (exports written before it existed are loaded with a warning).

    Returns:
        ``(model, tokenizer)``; ``model.pruning_plan`` holds the plan when ``plan.json`` exists.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .dtypes import DTYPES

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model directory")
    if verify:
        if (path / MANIFEST).is_file():
            # every top-level file the export wrote (weights, config, plan, tokenizer, ...); GGUF files in
            # gguf/ are not read here (verify_manifest(path) checks them too)
            listed = verify_manifest(path, top_level=True)
            unlisted = [p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".bin")
                        and p.name not in listed]
            if unlisted:
                raise ValueError(f"{path}: weight files {unlisted} are not in {MANIFEST} (added after the export); "
                                 "pass verify=False to load anyway")
        else:
            import warnings

            warnings.warn(f"{path} has no {MANIFEST} (written before nirvana-lightning 0.2): its files are not "
                          "verified", stacklevel=2)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in FAMILIES:
        raise ValueError(f"model_type {config.model_type!r}; supported: {sorted(FAMILIES)}")
    cls = remote_modeling.pruned_class(config.model_type)
    plan = None
    if (path / PLAN_FILE).is_file():
        try:
            plan = PruningPlan.from_json((path / PLAN_FILE).read_text())
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path / PLAN_FILE} is corrupt: {err}") from err
        _check_plan_against_config(plan, config)
    kwargs = {"dtype": DTYPES[check_choice("dtype", dtype, DTYPES)]} if dtype else {"dtype": "auto"}
    from .serving.quantize import QUANT_FILE

    if (path / QUANT_FILE).is_file():
        model = _load_quantized(cls, path, config, kwargs["dtype"] if dtype else None)
    else:
        model = cls.from_pretrained(path, config=config, **kwargs)
    model.eval()
    model.pruning_plan = plan
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer


__all__ = ["load_pruned", "save_pruned"]
