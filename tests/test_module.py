"""The LightningModule without the CLI: recovery modes, optimizer and schedule."""

import math

import lightning as L
import pytest
import torch

from nirvana_lightning import NirvanaModule
from nirvana_lightning.data import NirvanaDataModule


def _fit(recovery, tmp_path, steps=3, precision="32-true", **kwargs):
    L.seed_everything(0)
    kwargs.setdefault("lr", 1e-2)
    module = NirvanaModule(source="tiny-llama", recovery=recovery, warmup_steps=1, lora_r=4, **kwargs)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=32, max_val_windows=2,
                             batch_size=2)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, val_check_interval=steps,
                        default_root_dir=tmp_path, precision=precision)
    module.build_model()
    before = {n: p.detach().clone() for n, p in module.base_model.named_parameters()}
    trainer.fit(module, datamodule=data)
    return module, before, trainer


def test_lora_trains_adapters_only(tmp_path):
    module, before, trainer = _fit("lora", tmp_path)
    changed = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert changed and all("lora_" in n for n in changed)
    base = module.base_model
    # base weights (under the LoRA wrappers) are untouched
    for n, p in base.named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, before[key]), n
    assert torch.isfinite(trainer.callback_metrics["val/ppl"])


def test_full_changes_weights_and_schedule_warms_up(tmp_path):
    module, before, trainer = _fit("full", tmp_path, steps=4)
    assert any(not torch.equal(p, before[n]) for n, p in module.base_model.named_parameters())
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    lrs = [scheduler.lr_lambdas[0](s) for s in range(4)]
    assert lrs[0] == 1.0 and lrs[-1] < lrs[1]  # warmup of 1 step, then cosine decay toward min_lr_ratio
    assert min(lrs) >= module.hparams.min_lr_ratio - 1e-9


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain, _, _ = _fit("full", tmp_path / "a", steps=2)
    ckpt, _, _ = _fit("full", tmp_path / "b", steps=2, gradient_checkpointing=True)
    base = ckpt.base_model
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    for (n, p), (_, q) in zip(plain.base_model.named_parameters(), ckpt.base_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_true_keeps_adapters_optimizer_and_metrics_in_full_precision(tmp_path):
    """Under bf16-true the base is bf16, but LoRA weights, AdamW moments and the perplexity sums are not."""
    from nirvana_lightning.recovery.objectives import lm_loss

    module, _, trainer = _fit("lora", tmp_path, steps=3, dtype="bfloat16", precision="bf16-true", lr=1e-5)
    lora = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for n, p in module.model.named_parameters() if "lora_" not in n)
    state = trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert module.val_nll.mean_value.dtype == torch.float64
    # RoPE's inv_freq is back in float32, bit for bit as loaded (transformers recomputes it so at export reload)
    fresh = NirvanaModule(source="tiny-llama", dtype="bfloat16").build_model()
    for name, buffer in fresh.named_buffers():
        assert torch.equal(module.base_model.get_buffer(name), buffer) and buffer.dtype == torch.float32, name
    # the logged perplexity equals a float64 sum over the same validation batches (same forward context)
    total, count = 0.0, 0
    module.model.eval()
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for batch in trainer.datamodule.val_dataloader():
            loss, n = lm_loss(module.model, batch)
            total, count = total + float(loss) * n, count + n
    assert float(trainer.callback_metrics["val/ppl"]) == pytest.approx(math.exp(total / count), rel=1e-6)


def test_teacher_device_is_relative_to_each_rank(monkeypatch):
    from nirvana_lightning.errors import ConfigError
    from nirvana_lightning.module import resolve_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    cuda = [torch.device("cuda", i) for i in range(8)]
    assert [resolve_device("+1", cuda[r], 4, key="k") for r in range(4)] == cuda[1:5]
    assert resolve_device("+4", cuda[6], 8, key="k") == cuda[2]  # wraps around the node's devices
    assert resolve_device("+1", torch.device("cpu"), 2, key="k") == torch.device("cpu")
    assert resolve_device("cuda:1", cuda[0], 1, key="k") == cuda[1]  # one process: an absolute device is fine
    assert resolve_device("cpu", cuda[3], 8, key="k") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"model\.teacher_device='cuda:1'.*every rank"):
        resolve_device("cuda:1", cuda[0], 2, key="model.teacher_device")
    with pytest.raises(ConfigError, match=r"\+N"):
        resolve_device("+one", cuda[0], 1, key="model.teacher_device")


def test_kl_callback_offloads_the_dense_copy_between_measurements(monkeypatch):
    """device=offload: the dense copy is moved to the model's device for a measurement and back to the host after."""
    from nirvana_lightning.callbacks.kl import KLToDenseCallback
    from nirvana_lightning.debug_models import build_tiny_model

    reference = build_tiny_model("tiny-llama")
    moves = []
    original = reference.to
    monkeypatch.setattr(reference, "to", lambda *a, **k: (moves.append(str(a[0])), original(*a, **k))[1])

    class Module:
        model = build_tiny_model("tiny-llama", seed=1)

        def dense_reference(self, device=None):
            moves.append(f"load:{device}")
            return reference

    class Trainer:
        class datamodule:  # noqa: N801
            @staticmethod
            def val_dataloader():
                ids = torch.randint(0, 256, (2, 8))
                return [{"input_ids": ids, "labels": ids}]

    kl = KLToDenseCallback(device="offload").evaluate(Trainer(), Module(), "pruned")
    assert kl["val"] > 0
    assert moves == ["load:cpu", "cpu", "cpu"]  # loaded in host memory, moved to the model's device, moved back
