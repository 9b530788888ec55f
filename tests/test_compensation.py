"""FLAP bias compensation: the compensated pruned model equals the dense model with the removed units' inputs
replaced by their calibration means (the masked/pruned equivalence, with means instead of zeros)."""

import copy

import pytest
import torch

from nirvana_lightning import load_pruned, prune, save_pruned
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.errors import ConfigError
from nirvana_lightning.families import get_family
from nirvana_lightning.pruning.surgery import expand_group_index

CALIB = torch.randint(0, 256, (6, 20), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))


def _mean_filled(dense, plan, calib):
    """Hooks on the dense model: o_proj / down_proj inputs of removed units replaced by their calibration means."""
    family = get_family(dense)
    g, d = family.n_query_per_kv, family.head_dim
    sums = {}

    def record(key):
        def hook(_m, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            n, s = sums.get(key, (0, 0.0))
            sums[key] = (n + x.shape[0], s + x.sum(0))
        return hook

    layers = family.layers()
    handles = []
    for i, layer in enumerate(layers):
        handles += [family.attention(layer).o.register_forward_pre_hook(record((i, "o"))),
                    family.mlp(layer).down.register_forward_pre_hook(record((i, "down")))]
    with torch.no_grad():
        dense(input_ids=calib)
    for h in handles:
        h.remove()

    def fill(key, removed):
        mean = sums[key][1] / sums[key][0]

        def hook(_m, args):
            x = args[0].clone()
            x[..., removed] = mean[removed].to(x.dtype)
            return (x,)
        return hook

    for i, layer in enumerate(layers):
        kept = torch.zeros(plan.n_kv_group_before[i], dtype=torch.bool)
        kept[plan.attention_keep[i]] = True
        heads = expand_group_index((~kept).nonzero().flatten().tolist(), g * d)
        neurons = torch.ones(plan.mlp_dim_before[i], dtype=torch.bool)
        neurons[plan.mlp_keep[i]] = False
        family.attention(layer).o.register_forward_pre_hook(fill((i, "o"), heads))
        family.mlp(layer).down.register_forward_pre_hook(fill((i, "down"), neurons.nonzero().flatten()))
    return dense


@pytest.mark.parametrize("criterion", ["flap", "nirvana", "magnitude"])
def test_compensated_pruned_model_equals_the_mean_filled_dense_model(tmp_path, criterion):
    dense = build_tiny_model("tiny-llama")
    model = copy.deepcopy(dense)
    plan = prune(model, CALIB, sparsity=0.4, gamma=1.5, criterion=criterion, bias_compensation=True)
    assert plan.provenance["bias_compensation"]["max_abs_bias"] > 0
    assert model.config.attention_bias and model.config.mlp_bias
    reference = _mean_filled(dense, plan, CALIB)
    with torch.no_grad():
        got, want = model(input_ids=IDS).logits, reference(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # without compensation the same cut is further from the mean-filled model
    plain = copy.deepcopy(build_tiny_model("tiny-llama"))
    prune(plain, CALIB, sparsity=0.4, gamma=1.5, criterion=criterion)
    with torch.no_grad():
        assert (plain(input_ids=IDS).logits - want).abs().max() > (got - want).abs().max()
    # the biases survive export and a reload with the stock classes
    save_pruned(model, None, tmp_path / "export", plan)
    reloaded, _ = load_pruned(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, got)


def test_compensation_refused_where_the_config_cannot_hold_the_biases():
    with pytest.raises(ConfigError, match="bias_compensation=True.*qwen2"):
        prune(build_tiny_model("tiny-qwen2"), CALIB, sparsity=0.4, bias_compensation=True)
    with pytest.raises(ConfigError, match="calibration"):
        prune(build_tiny_model("tiny-llama"), None, sparsity=0.4, criterion="magnitude", bias_compensation=True)


def test_callback_compensation_checkpoints_the_base_and_reloads(tmp_path):
    """Through the callback: the compensated biases are part of the base, so a LoRA checkpoint keeps the base;
    load_from_checkpoint re-applies the plan (zero biases) and loads their values."""
    import lightning as L

    from nirvana_lightning import Calibration, NirvanaModule, NirvanaPruningCallback, PruningTarget, Schedule, Scoring
    from nirvana_lightning.data import NirvanaDataModule

    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery="lora", lora_r=4, lora_dropout=0.0, warmup_steps=1)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=8, max_val_windows=2, batch_size=2)
    pruning = NirvanaPruningCallback(target=PruningTarget(sparsity=0.3), scoring=Scoring(criterion="flap"),
                                     calibration=Calibration(samples=4, seq_len=32), bias_compensation=True)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[pruning])
    trainer.fit(module, datamodule=data)
    assert pruning.plan.provenance["bias_compensation"]["max_abs_bias"] > 0
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert "nirvana_base_omitted" not in saved and any(k.endswith("down_proj.base_layer.bias") for k in saved["state_dict"])
    again = NirvanaModule.load_from_checkpoint(ckpt, weights_only=True)
    for name, value in module.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    with pytest.raises(ConfigError, match="bias_compensation.*iterative"):
        NirvanaPruningCallback(target=PruningTarget(sparsity=0.3), bias_compensation=True,
                               schedule=Schedule(kind="linear", n_steps=2, every_n_steps=1))


def test_adapter_only_export_refused_with_compensation(tmp_path):
    from nirvana_lightning.recovery import apply_recovery

    model = build_tiny_model("tiny-llama")
    plan = prune(model, CALIB, sparsity=0.4, bias_compensation=True)
    with pytest.raises(ValueError, match="adapter_only=True with bias compensation"):
        save_pruned(apply_recovery(model, "lora", lora_r=4), None, tmp_path / "a", plan, adapter_only=True)
