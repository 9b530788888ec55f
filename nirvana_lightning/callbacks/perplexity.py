"""Perplexity through a prune-then-recover run: validation set and named text datasets."""

from __future__ import annotations

import lightning as L

from ..contract import prunable
from ..data.sft import format_prompt
from ..data.sources import read_records, validate_source_spec
from ..errors import ConfigError, check_positive
from ..eval.perplexity import compute_perplexity, compute_text_perplexity
from .staged import StagedEvaluation


class PerplexityCallback(StagedEvaluation):
    """Perplexity of the dense, pruned and recovered model (and every N steps in between).

    Measures the datamodule's validation set (``val``) and any number of named text datasets.
    Stages and logging follow :class:`~nirvana_lightning.callbacks.staged.StagedEvaluation`:
    keys ``ppl/<dataset>`` (curve) and ``ppl/<dataset>/<dense|pruned|recovered>``.

    Args:
        dense: also measure the dense model at setup (list this callback before the pruning callback).
        every_n_steps: also measure every N optimizer steps during recovery.
        val: measure the datamodule's validation loader.
        datasets: ``{name: source}``; a source is a builtin corpus (``brown``, ``brown-alpaca``),
            a ``.txt``/``.jsonl``/``.json`` file or ``hf:<dataset>``. Texts are joined with EOS,
            tokenised once and scored in ``seq_len`` windows with ``stride``.
        text_field: record field holding the text of JSON / HF sources; Alpaca records
            (``instruction``/``input``/``output``) are scored as prompt + response.
        seq_len / stride: window length and step of the named datasets (stride < seq_len gives
            every scored token more left context; default: disjoint windows).
        max_tokens: cap on tokens per named dataset (first tokens of the joined text).
    """

    prefix = "ppl"

    def __init__(
        self,
        dense: bool = False,
        every_n_steps: int | None = None,
        val: bool = True,
        datasets: dict[str, str] | None = None,
        text_field: str = "text",
        seq_len: int = 256,
        stride: int | None = None,
        max_tokens: int | None = 16384,
    ) -> None:
        super().__init__(dense=dense, every_n_steps=every_n_steps)
        key = "PerplexityCallback."
        datasets = dict(datasets or {})
        for name, spec in datasets.items():
            if name == "val":
                raise ConfigError(key + "datasets", name, "a dataset name other than 'val' (reserved for the validation set)")
            validate_source_spec(spec, f"{key}datasets.{name}")
        if not val and not datasets:
            raise ConfigError(key + "val", val, "true, or at least one entry in datasets")
        check_positive(key + "seq_len", seq_len)
        if seq_len < 2:
            raise ConfigError(key + "seq_len", seq_len, "an integer >= 2")
        if stride is not None and not 0 < stride <= seq_len:
            raise ConfigError(key + "stride", stride, f"an integer in [1, seq_len={seq_len}] or null")
        if max_tokens is not None:
            check_positive(key + "max_tokens", max_tokens)
        self.val, self.datasets, self.text_field = val, datasets, text_field
        self.seq_len, self.stride, self.max_tokens = seq_len, stride, max_tokens
        self._texts: dict[str, list[str]] = {}

    def metric_label(self, metric: str) -> str:
        return "validation perplexity" if metric == "val" else f"perplexity ({metric})"

    def _texts_of(self, name: str) -> list[str]:
        if name not in self._texts:
            texts = []
            for i, r in enumerate(read_records(self.datasets[name])):
                if self.text_field in r:
                    texts.append(r[self.text_field])
                elif "instruction" in r and "output" in r:  # Alpaca records: prompt + response, as SFT sees them
                    texts.append(format_prompt(r) + r["output"])
                else:
                    raise ConfigError("PerplexityCallback.text_field", self.text_field,
                                      f"a field of every record of dataset {name!r} (record {i} has {sorted(r)})")
            self._texts[name] = texts
        return self._texts[name]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        device = next(pl_module.model.parameters()).device  # where the model is (the strategy places it)
        out = {}
        if self.val:
            out["val"] = compute_perplexity(pl_module.model, trainer.datamodule.val_dataloader(), device=device)
        tokenizer = prunable(pl_module).tokenizer
        for name in self.datasets:
            out[name] = compute_text_perplexity(pl_module.model, tokenizer, self._texts_of(name), seq_len=self.seq_len,
                                                stride=self.stride, max_tokens=self.max_tokens, device=device)
        return out
