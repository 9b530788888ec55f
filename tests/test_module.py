"""The LightningModule without the CLI: recovery modes, optimizer and schedule."""

import lightning as L
import torch

from nirvana_lightning import NirvanaModule
from nirvana_lightning.data import NirvanaDataModule


def _fit(recovery, tmp_path, steps=3, **kwargs):
    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery=recovery, lr=1e-2, warmup_steps=1, lora_r=4, **kwargs)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=32, max_val_windows=2,
                             batch_size=2)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, val_check_interval=steps,
                        default_root_dir=tmp_path)
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
