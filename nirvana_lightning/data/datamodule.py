"""The LightningDataModule: language modelling or instruction SFT, plus calibration windows."""

from __future__ import annotations

from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, check_choice, check_positive, check_positive_int
from ..loading import load_tokenizer, validate_source
from ..pruning.settings import CANDIDATE_MODES
from .calibration import check_window_count, sample_window_starts, sample_windows
from .sft import build_sft_example, collate_sft, format_prompt
from .sources import read_records, validate_source_spec
from .text import leading_bos, pack_documents, split_documents, start_with_bos

TASKS = ("lm", "sft")


class _Rows(Dataset):
    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch): resuming at an epoch boundary replays the same order.

    Lightning calls ``set_epoch`` at the start of every epoch (as for ``DistributedSampler``);
    under DDP Lightning substitutes its distributed sampler, which is seeded the same way.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def _collate_windows(rows: list[torch.Tensor]) -> dict:
    ids = torch.stack(rows)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class NirvanaDataModule(L.LightningDataModule):
    """Text for recovery training, validation perplexity and pruning calibration.

    Args:
        tokenizer: model source whose tokenizer to use (linked to ``model.source`` by the CLI).
        task: ``lm`` packs plain text into ``seq_len`` windows; ``sft`` builds Alpaca examples with
            the prompt masked out of the loss.
        sources: builtin corpora (``brown``, ``brown-alpaca``), local ``.txt``/``.jsonl``/``.json``
            files, or ``hf:<dataset>``.
        text_field: record field holding the text (``lm`` task, JSON sources).
        hf_split: split of ``hf:`` sources.
        seq_len: training / validation window (``lm``) or maximum example length (``sft``).
        val_fraction: fraction of documents (or SFT records) held out for validation.
        split_seed: seed of the train/val split and of the per-epoch training shuffle.
        max_train_windows / max_val_windows: optional caps (first windows after the split).
        batch_size / eval_batch_size: per-device batch sizes.
        num_workers: DataLoader workers.
        cache_dir: where embedded models are converted.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        task: Literal["lm", "sft"] = "lm",
        sources: list[str] | None = None,
        text_field: str = "text",
        hf_split: str = "train",
        seq_len: int = 256,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        max_train_windows: int | None = None,
        max_val_windows: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("data.task", task, TASKS)
        validate_source(tokenizer, "data.tokenizer")
        sources = list(sources) if sources is not None else (["brown"] if task == "lm" else ["brown-alpaca"])
        if not sources:
            raise ConfigError("data.sources", sources, "at least one source")
        for i, s in enumerate(sources):
            validate_source_spec(s, f"data.sources[{i}]")
        for key, value in (("data.seq_len", seq_len), ("data.batch_size", batch_size)):
            check_positive_int(key, value)
        for key, value in (("data.max_train_windows", max_train_windows), ("data.max_val_windows", max_val_windows),
                           ("data.eval_batch_size", eval_batch_size)):
            check_positive_int(key, value, allow_none=True)
        check_positive("data.num_workers", num_workers, allow_zero=True)
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError("data.val_fraction", val_fraction, "a fraction in [0, 1)")
        self.save_hyperparameters()
        self.tokenizer_source = tokenizer
        self.task, self.sources, self.text_field, self.hf_split = task, sources, text_field, hf_split
        self.seq_len, self.val_fraction, self.split_seed = seq_len, val_fraction, split_seed
        self.max_train_windows, self.max_val_windows = max_train_windows, max_val_windows
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.tokenizer = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._calibration_stream: torch.Tensor | None = None  # the training side of the split
        self._calibration_doc_starts: list[int] = []
        self._other_calibration: dict[tuple[str, ...], tuple[torch.Tensor, list[int]]] = {}  # calibration.source
        self._probe_stream: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Tokenise once; later calls (every stage) reuse the result."""
        if self.train_set is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_source, self.cache_dir)
        self.bos = leading_bos(self.tokenizer)  # every window starts with BOS when the tokenizer's encoding does
        records = [r for i, s in enumerate(self.sources) for r in self._read("data.sources", i, s)]
        train_idx, val_idx = split_documents(len(records), self.val_fraction, self.split_seed)
        if self.task == "lm":
            docs = self._tokenize([self._text(r, i) for i, r in enumerate(records)])
            train = pack_documents([docs[i] for i in train_idx], self.seq_len, self.tokenizer.eos_token_id)
            val = pack_documents([docs[i] for i in val_idx], self.seq_len, self.tokenizer.eos_token_id)
            train, val = train[: self.max_train_windows], val[: self.max_val_windows]
            train, val = start_with_bos(train, self.bos), start_with_bos(val, self.bos)
            if len(train) == 0:
                raise ConfigError("data.seq_len", self.seq_len, "a window no longer than the training text")
            self.train_set, self.val_set = _Rows(list(train)), _Rows(list(val))
            self._calibration_stream, self._calibration_doc_starts = self._stream([docs[i] for i in train_idx])
            self._probe_stream = self._stream([docs[i] for i in val_idx])[0]
        else:
            build = partial(build_sft_example, tokenizer=self.tokenizer, max_len=self.seq_len)
            train = [build(records[i]) for i in train_idx][: self.max_train_windows]
            val = [build(records[i]) for i in val_idx][: self.max_val_windows]
            self.train_set, self.val_set = _Rows(train), _Rows(val)
            texts = [format_prompt(records[i]) + records[i]["output"] for i in train_idx]
            self._calibration_stream, self._calibration_doc_starts = self._stream(self._tokenize(texts))
            val_texts = [format_prompt(records[i]) + records[i]["output"] for i in val_idx]
            self._probe_stream = self._stream(self._tokenize(val_texts))[0]
        rank_zero_info(
            f"data: {len(self.train_set)} train / {len(self.val_set)} val examples ({self.task}, "
            f"seq_len {self.seq_len}), {self._calibration_stream.numel()} calibration tokens"
        )

    def _read(self, key: str, index: int, spec: str) -> list[dict]:
        try:
            return read_records(spec, hf_split=self.hf_split)
        except ValueError as err:  # names the file (and line): report it under the key that named the file
            raise ConfigError(f"{key}[{index}]", spec, f"a readable text source: {err}") from None

    def _text(self, record: dict, index: int) -> str:
        if self.text_field not in record:
            raise ConfigError("data.text_field", self.text_field, f"a field of record {index}: {sorted(record)}")
        return record[self.text_field]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def _stream(self, docs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Documents joined with EOS, and where each document starts."""
        eos = self.tokenizer.eos_token_id
        starts, offset = [], 0
        for d in docs:
            starts.append(offset)
            offset += len(d) + 1
        return torch.tensor([t for d in docs for t in (*d, eos)], dtype=torch.long), starts

    def calibration_text(self, sources: tuple[str, ...] | list[str] | None = None) -> tuple[torch.Tensor, list[int]]:
        """The calibration token stream and its document starts: the training side of the split, or the text of
        ``sources`` (``calibration.source``: read, tokenised and kept on first use)."""
        if self._calibration_stream is None:
            self.setup("fit")
        if not sources:
            return self._calibration_stream, self._calibration_doc_starts
        key = tuple(sources)
        if key not in self._other_calibration:
            records = [r for i, s in enumerate(key) for r in self._read("calibration.source", i, s)]
            self._other_calibration[key] = self._stream(self._tokenize([self._text(r, i) for i, r in enumerate(records)]))
        return self._other_calibration[key]

    # ------------------------------------------------------------- loaders
    def _collate(self):
        if self.task == "lm":
            return _collate_windows
        return partial(collate_sft, pad_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_set), self.split_seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate(),
                          num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self._collate(),
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def calibration_windows(self, n_window: int, seq_len: int, seed: int,
                            sources: tuple[str, ...] | None = None) -> torch.Tensor:
        """Seeded calibration windows ``(N, T)`` from the training side of the split (or ``sources``)."""
        stream, _ = self.calibration_text(sources)
        check_window_count("calibration.samples", n_window, seq_len, stream.numel(), _what(sources))
        return start_with_bos(sample_windows(stream, n_window, seq_len, seed), self.bos)

    def calibration_candidates(self, n_candidate: int, n_window: int, seq_len: int, seed: int,
                               mode: str, sources: tuple[str, ...] | None = None):
        """Candidate calibration sets for KL selection, with their spans in the calibration stream.

        ``random``: candidate i is N seeded windows (seed + i) of the training-side text.
        ``document``: candidate i is one training document (its first N windows of T tokens),
        documents taken in a seeded random order among those at least T tokens long.

        Returns:
            ``(candidates, spans)``: lists of ``(N_i, T)`` LongTensors and of ``(stream, start, T)``.
        """
        n, t = n_window, seq_len
        stream, doc_starts = self.calibration_text(sources)
        if mode == "random":
            check_window_count("calibration.samples", n, t, stream.numel(), _what(sources))
            starts = [sample_window_starts(stream.numel(), n, t, seed + i) for i in range(n_candidate)]
        elif mode == "document":
            bounds = list(zip(doc_starts, [*doc_starts[1:], stream.numel()]))
            usable = [(a, b) for a, b in bounds if b - a > t]
            if len(usable) < n_candidate:
                raise ConfigError("selection.num_candidates", n_candidate, f"at most {len(usable)} documents of > {t} tokens")
            order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))[:n_candidate]
            starts = [list(range(usable[j][0], usable[j][1] - t + 1, t))[:n] for j in order.tolist()]
        else:
            raise ConfigError("selection.candidate_mode", mode, CANDIDATE_MODES)
        candidates = [start_with_bos(torch.stack([stream[s:s + t] for s in st]), self.bos) for st in starts]
        return candidates, [[("calibration", s, t) for s in st] for st in starts]

    def probe_windows(self, n_window: int, seq_len: int, seed: int):
        """Probe windows for KL selection from the VALIDATION documents (disjoint from calibration).

        Args:
            n_window / seq_len: ``selection.probe_samples`` / ``selection.probe_seq_len`` (their defaults live
                in :class:`~nirvana_lightning.pruning.settings.Selection`).
            seed: ``calibration.seed``.

        Returns:
            ``(probe, spans)``: a ``(n_window, seq_len)`` LongTensor and its ``(stream, start, T)``.
        """
        if self._probe_stream is None:
            self.setup("fit")
        if self._probe_stream.numel() < seq_len:
            raise ConfigError("data.val_fraction", self.val_fraction,
                              f"a split whose held-out text has at least {seq_len} tokens for the probe")
        check_window_count("selection.probe_samples", n_window, seq_len, self._probe_stream.numel(),
                           "held-out text (validation side of the split)")
        starts = sample_window_starts(self._probe_stream.numel(), n_window, seq_len, seed)
        probe = start_with_bos(torch.stack([self._probe_stream[s:s + seq_len] for s in starts]), self.bos)
        return probe, [("probe", s, seq_len) for s in starts]


def _what(sources) -> str:
    return f"calibration text of {list(sources)}" if sources else "calibration text (training side of the split)"
