"""The dtype names a setting accepts (``model.dtype``, ``load_pruned(dtype=...)``) and their torch dtypes."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
