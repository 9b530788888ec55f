"""Calibration windows for pruning: N seeded random windows of T tokens."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def check_window_count(key: str, n_window: int, seq_len: int, n_token: int, what: str) -> None:
    """Refuse more windows than the text holds without repeating itself: ``n_window * seq_len <= n_token``.

    Windows are drawn at random offsets, so more than that would score the same text several times
    (and, for a KL probe, fill memory with duplicates); the error names the largest count that fits.
    """
    if n_window * seq_len > n_token:
        raise ConfigError(key, n_window, f"at most {n_token // seq_len} windows of {seq_len} tokens: the {what} has "
                                         f"{n_token} tokens (lower it, shorten the windows, or add text)")


def sample_window_starts(n_token: int, n_window: int, seq_len: int, seed: int) -> list[int]:
    """Seeded random start offsets of ``n_window`` windows of ``seq_len`` in a stream of ``n_token``."""
    if n_token < seq_len:
        raise ValueError(
            f"calibration text has {n_token} tokens, shorter than one window of {seq_len}; "
            "add calibration text or lower calibration.seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_token - seq_len + 1, (n_window,), generator=gen).tolist()


def sample_windows(stream: torch.Tensor, n_window: int, seq_len: int, seed: int) -> torch.Tensor:
    """Draw ``n_window`` windows of ``seq_len`` tokens at seeded random offsets of a token stream.

    Args:
        stream: LongTensor ``(n_token,)``.

    Returns:
        LongTensor ``(n_window, seq_len)``; the same seed always gives the same windows.
    """
    starts = sample_window_starts(stream.numel(), n_window, seq_len, seed)
    return torch.stack([stream[s : s + seq_len] for s in starts])
