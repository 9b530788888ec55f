"""Calibration windows for pruning: N seeded random windows of T tokens."""

from __future__ import annotations

import torch


def sample_windows(stream: torch.Tensor, n_window: int, seq_len: int, seed: int) -> torch.Tensor:
    """Draw ``n_window`` windows of ``seq_len`` tokens at seeded random offsets of a token stream.

    Args:
        stream: LongTensor ``(n_token,)``.

    Returns:
        LongTensor ``(n_window, seq_len)``; the same seed always gives the same windows.
    """
    if stream.numel() < seq_len:
        raise ValueError(
            f"calibration text has {stream.numel()} tokens, shorter than one window of {seq_len}; "
            "add calibration text or lower data.calibration_seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n_window,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
