"""gamma 'auto': the grid gamma whose pruned model is closest to the dense one on a held-out probe."""

import copy

import lightning as L
import pytest
import torch

from nirvana_lightning import (
    Calibration,
    NirvanaModule,
    NirvanaPruningCallback,
    PruningTarget,
    Schedule,
    Selection,
    make_plan,
    prune,
)
from nirvana_lightning.data import NirvanaDataModule
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.errors import ConfigError
from nirvana_lightning.pruning.gamma import GAMMA_GRID
from nirvana_lightning.pruning.selection import compute_dense_logprobs, mean_token_kl

CALIB = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(2))


def test_auto_picks_the_lowest_kl_of_really_pruned_copies_and_is_deterministic():
    model = build_tiny_model("tiny-llama")
    plan = make_plan(model, CALIB, sparsity=0.4, gamma="auto", probe=PROBE)
    again = make_plan(model, CALIB, sparsity=0.4, gamma="auto", probe=PROBE)
    search = plan.provenance["gamma_search"]
    assert again.fingerprint() == plan.fingerprint() and again.provenance["gamma_search"]["kls"] == search["kls"]
    assert plan.provenance["gamma_mode"] == "auto" and plan.provenance["gamma"] == search["gamma"]
    with torch.no_grad():
        dense = compute_dense_logprobs(model, PROBE)
    for g, kl in zip(search["gammas"], search["kls"]):
        if kl is None:
            continue
        pruned = copy.deepcopy(model)  # a real cut, not the masking the search uses
        prune(pruned, CALIB, sparsity=0.4, gamma=g)
        assert mean_token_kl(pruned, PROBE, dense)[0] == pytest.approx(kl, rel=1e-4, abs=1e-7), g
    feasible = [kl for kl in search["kls"] if kl is not None]
    assert search["kls"][search["best_index"]] == min(feasible)  # never worse than any fixed grid value (1, 3, ...)
    assert {1.0, 3.0} <= set(search["gammas"])


def test_auto_with_a_parameter_budget_and_infeasible_gammas():
    from nirvana_lightning import count_parameters

    model = build_tiny_model("tiny-llama")
    n = count_parameters(model)
    budget = n["total"] - int(0.7 * n["block"])  # remove 70% of the block weights
    plan = make_plan(model, CALIB, param_budget=budget, gamma="auto", probe=PROBE, gamma_grid=[1, 2, 50])
    search = plan.provenance["gamma_search"]
    assert search["kls"][2] is None and "50" in search["infeasible"]  # 50: more than every MLP unit would go
    assert search["gamma"] in (1.0, 2.0) and plan.provenance["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_auto_refusals():
    model = build_tiny_model("tiny-llama")
    with pytest.raises(ConfigError, match="probe=None"):
        make_plan(model, CALIB, sparsity=0.4, gamma="auto")
    with pytest.raises(ConfigError, match="probe.*disjoint"):
        make_plan(model, CALIB, sparsity=0.4, gamma="auto", probe=CALIB[:2])  # the calibration itself
    with pytest.raises(ConfigError, match="gamma='sometimes'"):
        make_plan(model, CALIB, sparsity=0.4, gamma="sometimes", probe=PROBE)
    with pytest.raises(ConfigError, match="gamma_grid"):
        make_plan(model, CALIB, sparsity=0.4, gamma="auto", probe=PROBE, gamma_grid=[0, 1])
    with pytest.raises(ConfigError, match=r"NirvanaPruningCallback\.target\.gamma='auto'.*iterative"):
        NirvanaPruningCallback(target=PruningTarget(sparsity=0.4, gamma="auto"),
                               schedule=Schedule(kind="linear", n_steps=2, every_n_steps=2))
    assert len(GAMMA_GRID) >= 5


def test_callback_gamma_auto_writes_its_curve(tmp_path):
    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery="none")
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=8, max_val_windows=2, batch_size=2)
    callback = NirvanaPruningCallback(target=PruningTarget(sparsity=0.3, gamma="auto", gamma_grid=[1, 3]),
                                      calibration=Calibration(samples=4, seq_len=32),
                                      selection=Selection(probe_samples=4, probe_seq_len=32))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, datamodule=data)
    assert callback.plan.provenance["gamma_search"]["gammas"] == [1.0, 3.0]
    table = (tmp_path / "gamma.md").read_text()
    assert "(selected)" in table and table.count("| 1 ") + table.count("| 3 ") >= 1
