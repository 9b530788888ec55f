"""The combination matrix (marker ``matrix``; ``.ci/run`` runs it after the suite): every pair of values of any
two feature axes (tests/matrix.py) in at least one tiny fit, each ending in exit 0 with its invariants, or in
its documented refusal before any weight loads.

Invariants of a cell that runs:
* every rank ends with the same plan and bit-identical trained tensors;
* a multi-process cell's (first) plan equals the plan of the same config in one process (same windows);
* the export reloads in this process (fresh for the fit) to the trained model's logits (LoRA merged: fp32
  rounding; int8: bit-identical to an int8 copy of the trained model made in the fit, and every block weight
  counted int8); a GGUF records the plan.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from fit_process import run_fit
from matrix import AFTER_THE_PLAN, AXES, REFUSAL_CELLS, cell_config, cell_id, cells, n_pairs, refusal, uncovered_pairs

pytestmark = pytest.mark.matrix

CELLS = cells()


def test_the_cells_cover_every_pair():
    """Checked here without the generator: every pair of values of two axes is in a cell that runs, or is a
    documented refusal that has its own cell."""
    assert uncovered_pairs(CELLS) == []
    assert all(refusal(c) is None for c in CELLS)
    refused = {refusal(c)[0] for c in REFUSAL_CELLS}
    from matrix import REFUSALS

    assert refused == {what for what, _, _ in REFUSALS}, "every documented refusal has a cell"
    assert n_pairs() == 389 and len(CELLS) <= 44, (n_pairs(), len(CELLS))
    assert set(AXES["strategy"]) == {"single", "ddp", "fsdp2"}


def _fit(cell: dict, out: Path, reference: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(cell_config(cell, out, reference=reference)))
    return run_fit(config)


def _plan(out: Path, step: int | None = None) -> dict:
    name = "plan.json" if step is None else f"plan_step_{step}.json"
    return json.loads(next((out / "run").rglob(name)).read_text())


@pytest.mark.parametrize("cell", REFUSAL_CELLS, ids=[f"refused-{cell_id(i, c)[4:]}" for i, c in enumerate(REFUSAL_CELLS)])
def test_refused_cell(cell, tmp_path):
    proc = _fit(cell, tmp_path)
    what, pattern = refusal(cell)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 2 and last.startswith("nirvana-lightning: error:"), (what, proc.stderr[-3000:])
    assert re.search(pattern, last), (what, last)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "export").exists() and "train/loss" not in proc.stderr
    if what.startswith(AFTER_THE_PLAN):  # widths known from the plan: refused before the first training step
        assert not list(tmp_path.rglob("metrics.csv")) or "train/loss" not in "".join(
            p.read_text() for p in tmp_path.rglob("metrics.csv"))
    else:
        assert "Loading weights" not in proc.stderr, proc.stderr[-3000:]
        assert not list(tmp_path.rglob("plan.json"))


@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(i, c) for i, c in enumerate(CELLS)])
def test_cell(cell, tmp_path):
    proc = _fit(cell, tmp_path / "cell")
    assert proc.returncode == 0, proc.stderr[-4000:]
    world = 1 if cell["strategy"] == "single" else 2
    ranks = [json.loads((tmp_path / "cell" / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["world_size"] == world for r in ranks)
    assert len({r["plan"] for r in ranks}) == 1 and len({r["weights"] for r in ranks}) == 1, "ranks differ"
    assert ranks[0]["steps_pruned"] == (2 if cell["schedule"] == "iterative" else 1)
    assert [r["scored"] for r in ranks] == [ranks[0]["steps_pruned"]] + [0] * (world - 1), "rank 0 scores alone"
    plan = _plan(tmp_path / "cell")
    assert plan["provenance"]["realised_sparsity" if cell["schedule"] == "iterative" else "sparsity"] > 0
    if world > 1:  # the same windows in one process give the same (first) plan
        single = _fit(cell, tmp_path / "single", reference=True)
        assert single.returncode == 0, single.stderr[-4000:]
        step = 1 if cell["schedule"] == "iterative" else None
        assert _plan(tmp_path / "single", step)["keep"] == _plan(tmp_path / "cell", step)["keep"]
    _check_export(cell, tmp_path / "cell" / "export", ranks[0], plan)


def _check_export(cell: dict, export: Path, record: dict, plan: dict) -> None:
    from nirvana_lightning import load_pruned
    from nirvana_lightning.families import get_family

    model, _ = load_pruned(export)
    ids = torch.arange(1, 17).reshape(2, 8) * 37 % 1000
    kwargs, _ = get_family(model).model_inputs(ids)
    with torch.no_grad():
        logits = model(**kwargs).logits.float()
    # bit-identical to what was exported: the trained model with LoRA merged (and int8-quantised for int8)
    assert torch.equal(logits, torch.tensor(record["export_logits"]))
    # the merged model is the trained one: unmerged LoRA differs in fp32 rounding only, relative to the logits'
    # scale (the tiny fixtures' weights have std 0.2, so their logits are large; T5's six blocks amplify most)
    if cell["export"] != "int8":
        trained = torch.tensor(record["logits"])
        scale = max(1.0, trained.abs().max().item())
        torch.testing.assert_close(logits, trained, rtol=0, atol=1e-4 * scale)
    else:
        from nirvana_lightning.serving.quantize import block_linear_names

        info = json.loads((export / "quantization.json").read_text())
        assert info["quantized_tensors"] == len(block_linear_names(model)) > 0
    if cell["export"] == "gguf":
        import gguf

        files = list((export / "gguf").glob("*.gguf"))
        assert len(files) == 1, files
        fields = gguf.GGUFReader(str(files[0])).fields
        from nirvana_lightning.pruning.plan import PruningPlan

        assert bytes(fields["nirvana.plan_fingerprint"].parts[-1]).decode() == PruningPlan.from_dict(plan).fingerprint()
