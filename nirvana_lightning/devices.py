"""Device settings resolved for one rank (``cpu``, ``cuda:1``, ``+N``)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(spec: str, root: torch.device, world_size: int, *, key: str) -> torch.device:
    """A device setting for one rank: ``cpu``, ``+N`` (this rank's accelerator index + N, modulo the
    number of devices of that type) or an absolute device, refused under several processes when it names
    one accelerator (every rank would put its copy there)."""
    spec = str(spec).strip()
    if spec.startswith("+"):
        if not spec[1:].isdigit():
            raise ConfigError(key, spec, "cpu, a device such as cuda:1, or +N (N accelerators after each rank's own)")
        if root.type == "cpu":
            return root
        count = torch.cuda.device_count() if root.type == "cuda" else 1
        return torch.device(root.type, ((root.index or 0) + int(spec[1:])) % max(1, count))
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(key, spec, "cpu, a device such as cuda:1, or +N (N accelerators after each rank's own)") from None
    if world_size > 1 and device.type != "cpu":
        raise ConfigError(key, spec, f"cpu or +N under {world_size} processes ({spec!r} would put every rank's copy "
                          "on the same device)")
    return device
