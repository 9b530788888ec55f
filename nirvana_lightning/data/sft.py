"""Instruction tuning in Alpaca format: template, prompt masking, EOS."""

from __future__ import annotations

from .text import leading_bos

IGNORE_INDEX = -100

ALPACA_TEMPLATE = {
    "with_input": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}


def format_prompt(record: dict) -> str:
    """The Alpaca prompt for a record with ``instruction`` and optional ``input``."""
    if record.get("input"):
        return ALPACA_TEMPLATE["with_input"].format(instruction=record["instruction"], input=record["input"])
    return ALPACA_TEMPLATE["no_input"].format(instruction=record["instruction"])


def build_sft_example(record: dict, tokenizer, max_len: int) -> dict[str, list[int]]:
    """Tokenise one Alpaca record: prompt positions get label -100, the response ends with EOS.

    Truncation cuts the prompt from the left first so the response (and its EOS) survives when
    possible.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length <= ``max_len``.
    """
    for field in ("instruction", "output"):
        if field not in record:
            raise ValueError(f"Alpaca record lacks {field!r}: {sorted(record)}")
    prompt = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
    bos = leading_bos(tokenizer)
    if bos is not None:
        prompt = [bos, *prompt]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response = response[:max_len - 1]
    prompt = prompt[-(max_len - len(response)):]
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def collate_sft(examples: list[dict[str, list[int]]], pad_id: int) -> dict:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
