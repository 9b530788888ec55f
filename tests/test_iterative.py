"""Iterative prune-train schedules, plan composition, optimizer rebuild, and distillation."""

import copy
import types

import lightning as L
import pytest
import torch

from nirvana_lightning import (
    Calibration,
    NirvanaModule,
    NirvanaPruningCallback,
    PruningReportCallback,
    PruningTarget,
    Schedule,
    cut,
    masked_units,
    prune,
)
from nirvana_lightning.data import NirvanaDataModule
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.errors import ConfigError
from nirvana_lightning.families import get_family
from nirvana_lightning.pruning.allocation import removal_counts
from nirvana_lightning.pruning.plan import compose_plans
from nirvana_lightning.pruning.schedule import cumulative_sparsity, step_sparsity
from nirvana_lightning.recovery import check_rebuildable

CALIBRATION = Calibration(samples=4, seq_len=16)  # the pruning callback's calibration windows in the fits


# ---------------------------------------------------------------- pure schedule
def test_schedule_curves_end_on_target():
    s, n = 0.5, 4
    for schedule in ("linear", "constant", "cubic"):
        values = [cumulative_sparsity(schedule, s, k, n) for k in range(1, n + 1)]
        assert values[-1] == s and values == sorted(values) and values[0] > 0
    assert [cumulative_sparsity("linear", s, k, n) for k in range(1, 5)] == [0.125, 0.25, 0.375, 0.5]
    kept = [1 - cumulative_sparsity("constant", s, k, n) for k in range(0 + 1, n + 1)]
    ratios = [b / a for a, b in zip([1.0, *kept[:-1]], kept)]
    assert max(ratios) - min(ratios) < 1e-12  # the same fraction of what remains at every step
    assert cumulative_sparsity("cubic", s, 1, n) > cumulative_sparsity("linear", s, 1, n)  # front-loaded
    assert cumulative_sparsity("once", s, 1, 1) == s
    assert step_sparsity(0.5, 1000, 750) == pytest.approx(1 - 500 / 750)


def test_removal_counts_match_allocation_and_counts_override():
    from nirvana_lightning.pruning.allocation import allocate

    gen = torch.Generator().manual_seed(0)
    attn = [torch.rand(4, generator=gen) for _ in range(3)]
    mlp = [torch.rand(64, generator=gen) for _ in range(3)]
    kw = dict(gamma=2.0, n_query_per_kv=2, head_dim=8)
    result = allocate(attn, mlp, sparsity=0.35, round_to=1, **kw)
    assert removal_counts([4] * 3, [64] * 3, sparsity=0.35, **kw) == (result.n_attn_requested, result.n_mlp_requested)
    forced = allocate(attn, mlp, sparsity=0.35, round_to=1, counts=(2, 10), **kw)
    assert sum(4 - len(k) for k in forced.attention_keep) == 2 and sum(64 - len(k) for k in forced.mlp_keep) == 10
    with pytest.raises(ConfigError, match="allocation"):
        allocate(attn, mlp, sparsity=0.35, round_to=1, counts=(2, 10), mode="uniform", **kw)


def test_compose_equals_applying_the_steps_in_sequence(family, granularity):
    sequential = build_tiny_model(family)
    first = prune(sequential, None, sparsity=0.25, criterion="magnitude", attention_granularity=granularity)
    second = prune(sequential, None, sparsity=0.3, criterion="magnitude", attention_granularity=granularity)
    composed = compose_plans(first, second)
    assert composed.granularity == granularity
    assert composed.block_params_after == second.block_params_after
    direct = build_tiny_model(family)
    cut(direct, composed)
    for (name, p), (_, q) in zip(sequential.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(p, q), name
    assert [s["sparsity"] for s in composed.provenance["steps"]] == [0.25, 0.3]
    with pytest.raises(ValueError, match="widths"):
        compose_plans(second, first)


def test_group_and_query_head_steps_compose(family):
    """A query_head step after a group step (and the reverse): the composed plan, written at query_head
    granularity, cuts what the two steps cut."""
    for kinds in (("group", "query_head"), ("query_head", "group")):
        sequential = build_tiny_model(family)
        steps = [prune(sequential, None, sparsity=s, criterion="magnitude", attention_granularity=k)
                 for s, k in zip((0.2, 0.3), kinds)]
        with pytest.raises(ValueError, match="compose only with the family's query-head unit kinds"):
            compose_plans(*steps)
        spec = get_family(sequential)
        composed = compose_plans(*steps, [spec.unit_kinds(layer, "query_head") for layer in spec.layers()])
        assert composed.granularity == "query_head"
        direct = build_tiny_model(family)
        cut(direct, composed)
        for (name, p), (_, q) in zip(sequential.state_dict().items(), direct.state_dict().items()):
            assert torch.equal(p, q), (kinds, name)


# ---------------------------------------------------------------- in a real fit
class _Observe(L.Callback):
    """Listed before the pruning callback: snapshots the model before each mid-training cut,
    then checks the cut, the rebuilt optimizer and the scheduler in ``on_nirvana_prune``."""

    def __init__(self, every: int) -> None:
        self.every, self.before, self.checks, self.losses = every, None, [], []
        self.x = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        if trainer.global_step % self.every == 0:
            model = copy.deepcopy(pl_module.model)
            self.before = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def on_nirvana_prune(self, trainer, pl_module, composed):
        step = trainer.callbacks[[type(c) for c in trainer.callbacks].index(NirvanaPruningCallback)].history[-1]
        pl_module.model.eval()
        self.before.eval()
        with torch.no_grad():
            got = pl_module.model(input_ids=self.x).logits
            with masked_units(self.before, step):
                want = self.before(input_ids=self.x).logits
        pl_module.model.train()
        optimizer = trainer.optimizers[0]
        in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
        trainable = [p for p in pl_module.model.parameters() if p.requires_grad]
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.checks.append({
            "max_diff": float((got - want).abs().max()), "scale": float(want.abs().max()),
            "same_params": len(in_optimizer) == len(trainable) and all(a is b for a, b in zip(in_optimizer, trainable)),
            "fresh_state": len(optimizer.state) == 0,
            "lr": optimizer.param_groups[0]["lr"],
            "lr_want": pl_module.hparams.lr * scheduler.lr_lambdas[0](trainer.global_step),
        })


def _fit(tmp_path, recovery, steps=6, every=2, n_steps=3, schedule="linear", sparsity=0.5, **module_kwargs):
    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery=recovery, lr=1e-3, warmup_steps=1, lora_r=4, **module_kwargs)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=64, max_val_windows=2,
                             batch_size=2)
    observe = _Observe(every)
    pruning = NirvanaPruningCallback(target=PruningTarget(sparsity=sparsity, gamma=2.0), calibration=CALIBRATION,
                                     schedule=Schedule(kind=schedule, n_steps=n_steps, every_n_steps=every))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[observe, pruning])
    trainer.fit(module, datamodule=data)
    return module, pruning, observe


@pytest.mark.parametrize("recovery", ["full", "lora"])
def test_linear_schedule_reaches_target_and_rebuilds_optimizer(tmp_path, recovery):
    module, pruning, observe = _fit(tmp_path, recovery)
    history = pruning.history
    assert len(history) == 3 and [p.provenance["step"] for p in history] == [1, 2, 3]
    assert [p.provenance["global_step"] for p in history] == [0, 2, 4]
    composed = history[0]
    for step in history[1:]:
        composed = compose_plans(composed, step)
    plan = module.pruning_plan
    assert plan.fingerprint() == composed.fingerprint() == pruning.plan.fingerprint()
    # the target within rounding: after the last step exactly the one-shot number of attention groups
    # is gone, and the one-shot number of neurons less at most round_to - 1 per layer (kept widths round up)
    want_attn, want_mlp = removal_counts(plan.n_kv_group_before, plan.mlp_dim_before, sparsity=0.5, gamma=2.0,
                                         n_query_per_kv=plan.n_query_per_kv, head_dim=plan.head_dim)
    assert sum(plan.n_kv_group_before) - sum(plan.n_kv_group_after) == want_attn > 0
    mlp_gone = sum(plan.mlp_dim_before) - sum(plan.mlp_dim_after)
    assert want_mlp - plan.n_layer * 7 <= mlp_gone <= want_mlp
    assert plan.block_params_after == history[-1].block_params_after
    # cumulative targets followed the linear curve (each step measured from the realised count)
    assert [p.provenance["target_cumulative_sparsity"] for p in history] == pytest.approx([1 / 6, 1 / 3, 0.5])
    # the model's shapes are the composed plan applied to the dense model
    dense = NirvanaModule(source="tiny-llama").build_model()
    cut(dense, plan)
    assert {n: p.shape for n, p in dense.named_parameters()} == \
        {n.replace(".base_layer", ""): p.shape for n, p in module.base_model.named_parameters() if "lora_" not in n}
    # each mid-training cut: pruned == masked pre-cut model, optimizer rebuilt over the new parameters,
    # Adam state fresh, learning rate continuing the schedule at the current step
    assert len(observe.checks) == 2
    for check in observe.checks:
        assert check["max_diff"] <= 1e-5 * max(1.0, check["scale"])
        assert check["same_params"] and check["fresh_state"]
        assert check["lr"] == pytest.approx(check["lr_want"])
    assert all(torch.isfinite(torch.tensor(observe.losses)))
    if recovery == "lora":
        names = [n for n, p in module.model.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)


def test_iterative_settings_fail_early():
    target = PruningTarget(sparsity=0.5)
    with pytest.raises(ConfigError, match=r"schedule\.at_epochs"):
        NirvanaPruningCallback(target=target, schedule=Schedule(kind="linear", n_steps=3))
    with pytest.raises(ConfigError, match=r"schedule\.at_epochs"):
        NirvanaPruningCallback(target=target, schedule=Schedule(kind="cubic", n_steps=3, at_epochs=[0, 2]))
    with pytest.raises(ConfigError, match=r"schedule\.every_n_steps"):
        NirvanaPruningCallback(target=target, schedule=Schedule(kind="cubic", n_steps=3, every_n_steps=0))
    with pytest.raises(ConfigError, match=r"schedule\.kind"):
        NirvanaPruningCallback(target=target, schedule=Schedule(n_steps=3))
    with pytest.raises(ConfigError, match=r"NirvanaPruningCallback\.schedule\.kind"):
        NirvanaPruningCallback(target=PruningTarget(sparsity=None, param_budget=10),
                               schedule=Schedule(kind="linear", n_steps=2, every_n_steps=2))
    fake = types.SimpleNamespace(strategy=object())
    with pytest.raises(ConfigError, match="trainer.strategy"):
        check_rebuildable(fake, "trainer.strategy")


# ---------------------------------------------------------------- distillation
def _batch():
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "labels": ids.clone()}


def test_kd_loss_is_zero_when_student_equals_teacher():
    module = NirvanaModule(source="tiny-llama", recovery="full", objective="kd", kd_temperature=2.0)
    module.build_model()
    module.configure_model()
    module.model.eval()  # no dropout in either
    loss, n = module._distillation_loss(_batch())
    assert n == 2 * 15 and abs(float(loss)) < 1e-6
    mixed = NirvanaModule(source="tiny-llama", recovery="full", objective="kd", kd_alpha=0.25)
    mixed.build_model()
    mixed.configure_model()
    mixed.model.eval()
    loss, _ = mixed._distillation_loss(_batch())
    lm = mixed.model(**_batch()).loss
    assert float(loss) == pytest.approx(0.75 * float(lm), rel=1e-5)


@pytest.mark.parametrize("recovery", ["full", "lora"])
def test_kd_recovery_trains_student_and_never_the_teacher(tmp_path, recovery):
    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery=recovery, lr=1e-2, warmup_steps=1, lora_r=4, objective="kd",
                           kd_temperature=2.0, kd_alpha=0.5, teacher_dtype="bfloat16")
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=32, max_val_windows=2,
                             batch_size=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path,
                        callbacks=[NirvanaPruningCallback(target=PruningTarget(sparsity=0.3, gamma=2.0),
                                                          calibration=CALIBRATION)])
    teacher = module.dense_reference()
    frozen = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.fit(module, datamodule=data)
    assert module.dense_reference() is teacher and teacher.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())
    assert not any(p is q for p in module.parameters() for q in teacher.parameters())  # not a submodule
    assert "_dense_reference" not in str(list(module.state_dict()))
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "train/kd" in trainer.callback_metrics


def test_epoch_schedule_can_start_after_dense_training(tmp_path):
    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery="full", lr=1e-3, warmup_steps=1)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=4, max_val_windows=2,
                             batch_size=2)
    pruning = NirvanaPruningCallback(target=PruningTarget(sparsity=0.4, gamma=2.0), calibration=CALIBRATION,
                                     schedule=Schedule(kind="cubic", n_steps=2, at_epochs=[1, 2]))
    report = PruningReportCallback(plot=False)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[report, pruning])
    trainer.fit(module, datamodule=data)
    history = pruning.history
    assert [(p.provenance["epoch"], p.provenance["global_step"]) for p in history] == [(1, 2), (2, 4)]
    assert history[0].provenance["sparsity"] == pytest.approx(history[0].provenance["step_sparsity"])  # not overwritten
    assert module.pruning_plan.fingerprint() == compose_plans(*history).fingerprint()
    assert module.pruning_plan.provenance["sparsity"] == 0.4 and trainer.global_step == 6
    # the report waited for the first step (epoch 1) and followed the schedule to the composed plan
    assert report.reported == module.pruning_plan.fingerprint()
    assert [r["mlp_neurons_kept"] for r in report.rows] == module.pruning_plan.mlp_dim_after


def test_a_schedule_cut_short_by_the_run_says_so(tmp_path):
    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery="full", lr=1e-3, warmup_steps=1)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=16, max_val_windows=2,
                             batch_size=2)
    pruning = NirvanaPruningCallback(target=PruningTarget(sparsity=0.4, gamma=2.0), calibration=CALIBRATION,
                                     schedule=Schedule(kind="linear", n_steps=3, every_n_steps=3))
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[pruning])
    with pytest.warns(UserWarning, match="ended after 2 of 3 steps"):
        trainer.fit(module, datamodule=data)
    assert module.pruning_plan.provenance["schedule_incomplete"] == {"steps_done": 2, "n_steps": 3}
