"""`sharding.on_rank_zero`: rank 0 runs the work, every rank gets its result, and a collective hidden inside the
work fails loudly on every rank, in bounded time, instead of hanging (the DDP + KL selection crash: the
selection read ``trainer.log_dir``, a broadcast, inside the rank-0 region)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from nirvana_lightning.sharding import CollectiveInRankZeroRegion, forbid_collectives, on_rank_zero

WORKER = textwrap.dedent(r"""
    import datetime, json, os, sys, types
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from nirvana_lightning.sharding import on_rank_zero

    class Strategy:  # what Lightning's DDPStrategy.broadcast does
        def broadcast(self, obj, src=0):
            box = [obj]
            dist.broadcast_object_list(box, src=src)
            return box[0]

    def work(rank, port, out, case):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # a short group timeout: without the guard, the hidden collective would end in a timeout, not our error
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
        trainer = types.SimpleNamespace(world_size=2, global_rank=rank, strategy=Strategy())
        def make():
            if case == "strategy":
                trainer.strategy.broadcast("log_dir")
            elif case == "barrier":
                dist.barrier()
            return {"answer": 42}
        try:
            result = {"value": on_rank_zero(trainer, make, what="the test region")}
        except Exception as err:
            result = {"error": type(err).__name__, "message": str(err)}
        # the guard is gone after the region: a collective works again on every rank
        result["after"] = trainer.strategy.broadcast(rank, src=0)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, out, case = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        mp.spawn(work, args=(port, out, case), nprocs=2)
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["none", "strategy", "barrier"])
def test_two_ranks(tmp_path, case):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result"
    # the timeout is a hang guard only (a busy machine is slow, never wrong)
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(out), case], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result.{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["after"] == ranks[1]["after"] == 0
    if case == "none":
        assert ranks[0]["value"] == ranks[1]["value"] == {"answer": 42}
        return
    name = "strategy.broadcast" if case == "strategy" else "torch.distributed.barrier"
    assert ranks[0]["error"] == "CollectiveInRankZeroRegion" and name in ranks[0]["message"]
    assert ranks[1]["error"] == "RuntimeError"
    assert "the test region failed on rank 0: CollectiveInRankZeroRegion" in ranks[1]["message"]
    assert name in ranks[1]["message"]


def test_single_process_refuses_the_same_collective():
    """One process never hangs, but the same rule holds, so the mistake is found before a DDP run."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(CollectiveInRankZeroRegion, match="trainer.log_dir|strategy.broadcast"):
        on_rank_zero(trainer, lambda: trainer.log_dir, what="a region")
    assert on_rank_zero(trainer, lambda: 7, what="a region") == 7
    assert isinstance(trainer.log_dir, (str, type(None)))  # the property (a broadcast) works again after the region


def test_forbid_collectives_restores_everything():
    originals = {name: getattr(dist, name) for name in ("broadcast", "barrier", "all_reduce")}
    with pytest.raises(CollectiveInRankZeroRegion, match="torch.distributed.all_reduce"):
        with forbid_collectives("x"):
            dist.all_reduce(None)
    assert {name: getattr(dist, name) for name in originals} == originals
