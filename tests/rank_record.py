"""A test-only callback: each rank writes its plan fingerprint and a hash of its weights at fit end."""

import hashlib
import json
from pathlib import Path

import lightning as L


class RecordRankState(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        h = hashlib.sha256()
        for name, p in sorted(pl_module.base_model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        record = {"plan": pl_module.pruning_plan.fingerprint(), "weights": h.hexdigest(),
                  "step": trainer.global_step}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
