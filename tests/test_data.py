"""Data: SFT masking, packing boundaries, deterministic splits, calibration windows, early config errors."""

from pathlib import Path

import pytest
import torch

from nirvana_lightning.data import (
    NirvanaDataModule,
    build_sft_example,
    pack_documents,
    read_records,
    sample_windows,
    split_documents,
)
from nirvana_lightning.data.sft import IGNORE_INDEX, collate_sft, format_prompt
from nirvana_lightning.errors import ConfigError

DATA = Path(__file__).parent / "data"


def test_sft_prompt_is_masked_and_eos_appended(smollm2_tokenizer):
    tok = smollm2_tokenizer
    record = {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"}
    ex = build_sft_example(record, tok, max_len=256)
    prompt_len = len(tok(format_prompt(record), add_special_tokens=False)["input_ids"])
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][prompt_len:-1]) == "5"


def test_truncation_keeps_the_response(smollm2_tokenizer):
    record = {"instruction": "word " * 200, "input": "", "output": "the answer"}
    ex = build_sft_example(record, smollm2_tokenizer, max_len=32)
    assert len(ex["input_ids"]) == 32 and ex["input_ids"][-1] == smollm2_tokenizer.eos_token_id
    assert smollm2_tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX][:-1]) == "the answer"


def test_pad_token_is_special_never_a_word(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id in tok.all_special_ids
    vocab_words = {tok.convert_ids_to_tokens(i) for i in tok("the cat sat on a mat", add_special_tokens=False)["input_ids"]}
    assert tok.pad_token not in vocab_words
    batch = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                        pad_id=tok.pad_token_id)
    assert batch["input_ids"][1].tolist() == [8, tok.pad_token_id, tok.pad_token_id]
    assert batch["labels"][1].tolist() == [8, -100, -100] and batch["attention_mask"][1].tolist() == [1, 0, 0]


def test_packing_boundaries():
    windows = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, separator_id=0)
    # stream 1 2 3 0 4 5 0 6 7 8 9 0 -> three full windows, the separator after each document
    assert windows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_documents([[1, 2, 3]], seq_len=3, separator_id=None).tolist() == [[1, 2, 3]]
    assert pack_documents([[1, 2]], seq_len=5, separator_id=0).shape == (0, 5)


def test_split_is_deterministic_and_disjoint():
    a = split_documents(100, 0.1, seed=7)
    assert a == split_documents(100, 0.1, seed=7)
    assert a != split_documents(100, 0.1, seed=8)
    train, val = a
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert len(split_documents(3, 0.01, seed=0)[1]) == 1  # at least one validation document


def test_calibration_windows_are_seeded():
    stream = torch.arange(1000)
    a, b = sample_windows(stream, 8, 16, seed=3), sample_windows(stream, 8, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (8, 16)
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous windows of the stream
    assert not torch.equal(a, sample_windows(stream, 8, 16, seed=4))
    assert sample_windows(stream, 2, 1000, seed=0).shape == (2, 1000)  # exactly one window fits
    with pytest.raises(ValueError, match="shorter than one window of 2000"):
        sample_windows(stream, 1, 2000, seed=0)


def test_readers():
    assert len(read_records(str(DATA / "small.txt"))) == 3
    assert read_records(str(DATA / "tiny_alpaca.jsonl"))[1]["output"] == "5"
    brown = read_records("brown")
    assert len(brown) > 200 and {"id", "category", "text"} <= set(brown[0])


def test_hf_dataset_source(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one two three", "four five"]}).save_to_disk(str(tmp_path / "ds"))
    assert [r["text"] for r in read_records(f"hf:{tmp_path / 'ds'}")] == ["one two three", "four five"]


def test_datamodule_lm_and_sft(smollm2_tokenizer):
    dm = NirvanaDataModule(tokenizer="smollm2-135m", task="lm", sources=[str(DATA / "small.txt"), "brown"],
                           seq_len=32, val_fraction=0.1, max_train_windows=64, max_val_windows=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["input_ids"], batch["labels"])
    assert len(dm.val_set) == 4
    assert torch.equal(dm.calibration_windows(4, 16, 0), dm.calibration_windows(4, 16, 0))
    assert dm.calibration_windows(4, 16, 0).shape == (4, 16)
    sft = NirvanaDataModule(tokenizer="smollm2-135m", task="sft", sources=[str(DATA / "tiny_alpaca.jsonl")],
                            seq_len=128, val_fraction=0.25, batch_size=2)
    sft.setup("fit")
    b = next(iter(sft.train_dataloader()))
    assert (b["labels"] == IGNORE_INDEX).any() and (b["labels"] != IGNORE_INDEX).any()
    assert len(sft.val_set) == 1 and len(sft.train_set) == 3


@pytest.mark.parametrize("kwargs,key", [
    ({"seq_len": -4}, "data.seq_len=-4"),
    ({"sources": ["/no/such/file.jsonl"]}, r"data.sources\[0\]='/no/such/file.jsonl'"),
    ({"task": "chat"}, "data.task='chat'"),
    ({"val_fraction": 1.5}, "data.val_fraction=1.5"),
    ({"tokenizer": "not-a-model"}, "data.tokenizer='not-a-model'"),
    ({"batch_size": 0}, "data.batch_size=0"),
])
def test_bad_values_fail_in_init_naming_the_key(kwargs, key, monkeypatch):
    import transformers

    def no_loading(*a, **k):
        raise AssertionError("nothing may load before validation")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    with pytest.raises(ConfigError, match=key):
        NirvanaDataModule(**kwargs)


def test_windows_start_with_bos_when_the_tokenizer_does():
    """Gemma's encoding starts with BOS and the model is far off without it: every window built for it starts with
    BOS (the first token replaced, shapes kept); SmolLM2's does not, and its windows are unchanged."""
    from nirvana_lightning import load_tokenizer
    from nirvana_lightning.data import leading_bos, start_with_bos
    from nirvana_lightning.eval.perplexity import build_text_windows

    assert leading_bos(load_tokenizer("smollm2-135m")) is None
    gemma = load_tokenizer("gemma3-270m")
    assert leading_bos(gemma) == gemma.bos_token_id == 2
    windows = torch.arange(12).view(3, 4) + 10
    assert torch.equal(start_with_bos(windows, None), windows)
    started = start_with_bos(windows, 2)
    assert started[:, 0].tolist() == [2, 2, 2] and torch.equal(started[:, 1:], windows[:, 1:])
    assert windows[0, 0] == 10  # not modified in place
    text = build_text_windows(list(range(10, 30)), seq_len=8, stride=4, bos=2)
    assert all(w["input_ids"][0, 0] == 2 for w in text)
    assert [w["labels"][0].tolist() for w in text] == [w["labels"][0].tolist() for w in build_text_windows(
        list(range(10, 30)), seq_len=8, stride=4)]  # the same tokens scored


def test_datamodule_windows_start_with_bos_for_gemma():
    data = NirvanaDataModule(tokenizer="gemma3-270m", seq_len=32, max_train_windows=8, max_val_windows=4,
                             batch_size=2)
    data.setup("fit")
    assert data.bos == 2
    assert all(int(w[0]) == 2 for w in data.train_set.rows) and all(int(w[0]) == 2 for w in data.val_set.rows)
    assert (data.calibration_windows(4, 16, 0)[:, 0] == 2).all()
    assert (data.probe_windows(4, 16, 0)[0][:, 0] == 2).all()
