"""Int8 weight-only quantisation of a pruned model for the PyTorch / transformers path, with torchao.

Why torchao: it is PyTorch's own quantisation library (the eager ``torch.ao.quantization`` API is
deprecated in its favour), it runs on CPU and CUDA, transformers (``TorchAoConfig``) and vLLM read its
formats, and its quantised weights are tensor subclasses that ``torch.load(weights_only=True)`` accepts,
so a quantised export reloads without executing code. bitsandbytes targets CUDA first; optimum-quanto
is in maintenance.

Layout of a quantised export: the directory of :func:`~nirvana_lightning.save_pruned` with
``model.safetensors`` replaced by ``model_int8.pt`` (the torchao state dict) and ``quantization.json``;
:func:`~nirvana_lightning.load_pruned` rebuilds the pruned shapes, quantises them the same way and loads
the state dict with ``weights_only=True``.
"""

from __future__ import annotations

from torch import nn

QUANT_FILE = "quantization.json"
INT8_WEIGHTS = "model_int8.pt"
METHODS = ("int8_weight_only",)


def _torchao():
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ImportError("int8 quantisation needs torchao: pip install 'nirvana-lightning[quant]'") from err
    return quantize_, Int8WeightOnlyConfig


def block_linear_names(model: nn.Module) -> set[str]:
    """Qualified names of the linear layers inside the family's pruned blocks (decoder layers; T5's encoder
    and decoder blocks): embeddings and the LM head (often tied to them) stay in float."""
    from ..families import get_family

    inside = {id(m) for layer in get_family(model).layers() for m in layer.modules() if isinstance(m, nn.Linear)}
    return {name for name, m in model.named_modules() if id(m) in inside}


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise every block linear weight to int8 (per output channel), in place; activations stay float.

    A model where the family finds no block linear layer is refused (a file that says int8 must hold int8
    weights); :func:`block_linear_names` lists the layers quantised.
    """
    quantize_, Int8WeightOnlyConfig = _torchao()
    names = block_linear_names(model)
    if not names:
        raise ValueError(f"int8 quantisation found no block linear layer in {type(model).__name__}")
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in names)
    return model


__all__ = ["INT8_WEIGHTS", "METHODS", "QUANT_FILE", "block_linear_names", "quantize_int8"]
