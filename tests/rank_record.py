"""A test-only callback: each rank writes its plan fingerprint and a hash of its weights at fit end."""

import hashlib
import json
from pathlib import Path

import lightning as L


class RecordRankState(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        import torch

        h = hashlib.sha256()
        for name, p in sorted(pl_module.base_model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())  # bf16 too, bit for bit
        pruning = next(c for c in trainer.callbacks if type(c).__name__ == "NirvanaPruningCallback")
        record = {"plan": pl_module.pruning_plan.fingerprint(), "weights": h.hexdigest(),
                  "step": trainer.global_step, "scored": pruning.scored_on_this_rank,
                  "trainable_dtypes": sorted({str(p.dtype)[6:] for p in pl_module.model.parameters() if p.requires_grad}),
                  "frozen_dtypes": sorted({str(p.dtype)[6:] for p in pl_module.model.parameters() if not p.requires_grad}),
                  "device": str(next(pl_module.base_model.parameters()).device)}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RecordShardedState(L.Callback):
    """Under FSDP2: each rank gathers the full state (a collective) and hashes it, records how much of the
    model it holds itself, and the logits of fixed ids through the sharded model."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        state = get_model_state_dict(pl_module.model, options=StateDictOptions(full_state_dict=True))
        h = hashlib.sha256()
        for name, p in sorted(state.items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        params = list(pl_module.model.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        ids = torch.arange(1, 17).reshape(2, 8) * 37 % 1000
        pl_module.model.eval()
        with torch.no_grad():
            logits = pl_module.model(input_ids=ids).logits
        pruning = next(c for c in trainer.callbacks if type(c).__name__ == "NirvanaPruningCallback")
        record = {"plan": pl_module.pruning_plan.fingerprint(), "weights": h.hexdigest(), "step": trainer.global_step,
                  "scored": pruning.scored_on_this_rank, "local_numel": local, "read_weights": pl_module.read_weights,
                  "global_numel": sum(p.numel() for p in params), "all_dtensor": all(isinstance(p, DTensor) for p in params),
                  "ids": ids.tolist(), "logits": logits.float().tolist()}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RecordCell(L.Callback):
    """The combination matrix's record of each rank at fit end (before the export): the plan's fingerprint, a
    hash of every trained tensor (gathered on every rank under FSDP2, a collective), the trained model's
    logits of fixed ids, and on rank 0 the logits of what the export writes (LoRA merged into a plain model,
    and its int8 copy when the ExportCallback quantises): the export must reload to exactly those."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        import copy

        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from nirvana_lightning.families import get_family
        from nirvana_lightning.recovery.lora import merged_model
        from nirvana_lightning.sharding import full_state_dict, is_fully_sharded

        model = pl_module.model
        sharded = is_fully_sharded(model)
        # FSDP2: every rank gathers the whole state (a collective) and hashes it, so ranks compare like DDP's
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if sharded \
            else model.state_dict()
        h = hashlib.sha256()
        for name, p in sorted(state.items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        ids = torch.arange(1, 17).reshape(2, 8) * 37 % 1000
        kwargs, _ = get_family(pl_module.base_model).model_inputs(ids)
        model.eval()
        with torch.no_grad():  # under FSDP2 every rank runs it (the forward gathers shards)
            logits = model(**kwargs).logits.float()
        host = full_state_dict(model) if sharded else None  # what the export gathers (rank 0), a collective
        pruning = next(c for c in trainer.callbacks if type(c).__name__ == "NirvanaPruningCallback")
        record = {"plan": pl_module.pruning_plan.fingerprint(), "weights": h.hexdigest(), "step": trainer.global_step,
                  "steps_pruned": len(pruning.history), "scored": pruning.scored_on_this_rank,
                  "world_size": trainer.world_size, "logits": logits.tolist()}
        if trainer.global_rank == 0:
            plain = merged_model(model, host).eval()
            export = next(c for c in trainer.callbacks if type(c).__name__ == "ExportCallback")
            if export.quantize:
                from nirvana_lightning.serving.quantize import quantize_int8

                plain = copy.deepcopy(plain)
                quantize_int8(plain)
            with torch.no_grad():
                record["export_logits"] = plain(**kwargs).logits.float().tolist()
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
