"""Evaluation library (perplexity, KL, report) and the evaluation callbacks' settings."""

import math

import pytest
import torch

from nirvana_lightning import KLToDenseCallback, PerplexityCallback, RunSummaryCallback, prune
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.errors import ConfigError
from nirvana_lightning.eval import (
    allocation_rows,
    build_text_windows,
    compute_kl,
    compute_perplexity,
    save_allocation_plot,
    token_kl,
)


def _pruning():
    """The pruning callback of the fit tests: 40% at gamma 2, scored on 4 calibration windows of 16 tokens."""
    from nirvana_lightning import Calibration, NirvanaPruningCallback, PruningTarget

    return NirvanaPruningCallback(target=PruningTarget(sparsity=0.4, gamma=2.0),
                                  calibration=Calibration(samples=4, seq_len=16))


def _hand_nll(model, ids: torch.Tensor, begin: int, end: int, targets: range) -> list[float]:
    """NLL of each target position p (predicted from p-1) with the context ids[begin:end]."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None, begin:end]).logits[0].double(), dim=-1)
    return [float(-logp[p - 1 - begin, ids[p]]) for p in targets]


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("tiny-llama").eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0))


def test_perplexity_equals_hand_computation_disjoint_windows(model, ids):
    ppl = compute_perplexity(model, build_text_windows(ids, 16))
    nll = []
    for begin in range(0, 50, 16):  # windows [0,16) [16,32) [32,48) [48,50): first token of each is context
        end = min(begin + 16, 50)
        nll += _hand_nll(model, ids, begin, end, range(begin + 1, end))
    assert len(nll) == 15 + 15 + 15 + 1
    assert math.isclose(ppl, math.exp(sum(nll) / len(nll)), rel_tol=1e-5)


def test_strided_windows_score_every_token_once_with_left_context(model, ids):
    windows = build_text_windows(ids, 16, stride=8)
    scored = []
    for w in windows:
        begin = next(b for b in range(0, 50, 8) if torch.equal(ids[b:b + w["input_ids"].shape[1]], w["input_ids"][0]))
        scored += [begin + j for j in range(1, w["labels"].shape[1]) if w["labels"][0, j] != -100]
    assert scored == list(range(1, 50))  # every token after the first, exactly once, in order
    # with a window covering the whole text, the windowed perplexity is the full-context one
    full = compute_perplexity(model, build_text_windows(ids, 64))
    hand = _hand_nll(model, ids, 0, 50, range(1, 50))
    assert math.isclose(full, math.exp(sum(hand) / len(hand)), rel_tol=1e-5)


def test_kl_to_itself_is_zero_and_positive_after_pruning(model, ids):
    batches = [{"input_ids": ids[None, :32], "labels": ids[None, :32]}]
    assert compute_kl(model, model, batches) == pytest.approx(0.0, abs=1e-6)
    pruned = build_tiny_model("tiny-llama").eval()
    prune(pruned, None, sparsity=0.3, criterion="magnitude")
    kl = compute_kl(pruned, model, batches)
    assert kl > 1e-4
    # the value is the mean over the 31 positions that predict a labelled token
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids[None, :32]).logits[0, :31].double(), -1)
        q = torch.log_softmax(pruned(input_ids=ids[None, :32]).logits[0, :31].double(), -1)
    assert kl == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)


def test_token_kl_is_differentiable_and_respects_mask_and_temperature():
    ref, logits = torch.randn(2, 5, 11), torch.randn(2, 5, 11, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    total, n = token_kl(ref, logits, mask, temperature=2.0, token_chunk=3)
    assert n == 6
    p = torch.log_softmax(ref[mask] / 2, -1)
    q = torch.log_softmax(logits[mask] / 2, -1)
    assert torch.allclose(total, (p.exp() * (p - q)).sum(), atol=1e-6)
    total.backward()
    assert logits.grad is not None and torch.all(logits.grad[~mask] == 0)
    zero, _ = token_kl(ref, ref.clone())
    assert float(zero) == pytest.approx(0.0, abs=1e-6)


def test_report_rows_equal_the_plan_and_plot_is_a_png(tmp_path, model):
    pruned = build_tiny_model("tiny-qwen2")
    plan = prune(pruned, None, sparsity=0.4, criterion="magnitude", gamma=2.0)
    rows = allocation_rows(plan)
    assert [r["kv_groups_kept"] for r in rows] == [len(k) for k in plan.attention_keep]
    assert [r["mlp_neurons_kept"] for r in rows] == [len(k) for k in plan.mlp_keep]
    assert [r["mlp_neurons"] for r in rows] == plan.mlp_dim_before
    assert all(r["mlp_kept"] == r["mlp_neurons_kept"] / r["mlp_neurons"] for r in rows)
    path = save_allocation_plot(plan, tmp_path / "allocation.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["allocation.png"]  # no temporary file left


@pytest.mark.parametrize("make, key", [
    (lambda: PerplexityCallback(every_n_steps=0), "PerplexityCallback.every_n_steps"),
    (lambda: PerplexityCallback(every_n_steps=-3), "PerplexityCallback.every_n_steps"),
    (lambda: PerplexityCallback(datasets={"x": "/no/such.txt"}), "PerplexityCallback.datasets.x"),
    (lambda: PerplexityCallback(datasets={"val": "brown"}), "PerplexityCallback.datasets"),
    (lambda: PerplexityCallback(val=False), "PerplexityCallback.val"),
    (lambda: PerplexityCallback(seq_len=16, stride=32), "PerplexityCallback.stride"),
    (lambda: KLToDenseCallback(every_n_steps=0), "KLToDenseCallback.every_n_steps"),
    (lambda: KLToDenseCallback(device="gpu"), "KLToDenseCallback.device"),
    (lambda: RunSummaryCallback(seq_len=0), "RunSummaryCallback.seq_len"),
])
def test_callbacks_reject_bad_settings(make, key):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == key


def test_summary_counts_the_merged_model_with_lora_and_orders_stages(tmp_path):
    import json

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from nirvana_lightning import NirvanaModule, PruningReportCallback
    from nirvana_lightning.data import NirvanaDataModule

    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery="lora", lr=1e-3, warmup_steps=1, lora_r=4)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=16, max_val_windows=2,
                             batch_size=2)
    summary = RunSummaryCallback(batch_size=1, seq_len=16, new_tokens=2, repeats=1)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[summary, PerplexityCallback(dense=True), KLToDenseCallback(),
                                   PruningReportCallback(plot=False), _pruning()])
    trainer.fit(module, datamodule=data)
    rows = json.loads((tmp_path / "lightning_logs" / "version_0" / "summary.json").read_text())["rows"]
    params = rows["params (total)"]
    assert params["recovered"] == params["pruned"] == module.pruning_plan.provenance["params_after"]
    assert params["dense"] == module.pruning_plan.provenance["params_before"]
    assert rows["LoRA adapter params (merged at export)"]["recovered"] > 0
    assert rows["validation perplexity"].keys() == {"dense", "pruned", "recovered"}
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "allocation.json").read_text())
    assert [r["mlp_neurons_kept"] for r in report["layers"]] == module.pruning_plan.mlp_dim_after
    assert not (tmp_path / "lightning_logs" / "version_0" / "allocation.png").exists()
    # speed was measured without the adapter wrappers, which are all back in place afterwards
    from peft.tuners.lora import LoraLayer

    n_lora = sum(isinstance(m, LoraLayer) for m in module.model.modules())
    assert n_lora == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert module.model.get_nb_trainable_parameters()[0] == rows["LoRA adapter params (merged at export)"]["recovered"]


def test_evaluation_callbacks_listed_after_pruning_fail_before_training(tmp_path):
    import lightning as L

    from nirvana_lightning import NirvanaModule
    from nirvana_lightning.data import NirvanaDataModule

    module = NirvanaModule(source="tiny-llama", recovery="full")
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=8, batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[_pruning(), PerplexityCallback(dense=True)])
    with pytest.raises(ConfigError, match="listed first"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


def test_prune_only_run_still_measures_the_final_model(tmp_path):
    import json

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from nirvana_lightning import NirvanaModule
    from nirvana_lightning.data import NirvanaDataModule

    module = NirvanaModule(source="tiny-llama", recovery="none")
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=8, max_val_windows=2,
                             batch_size=2)
    ppl = PerplexityCallback(dense=True)
    trainer = L.Trainer(max_steps=0, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RunSummaryCallback(speed=False), ppl, _pruning()])
    trainer.fit(module, datamodule=data)  # no training loop runs: on_train_end never fires
    assert set(ppl.results) == {"dense", "pruned", "recovered"}
    assert ppl.results["recovered"] == ppl.results["pruned"]
    rows = json.loads((tmp_path / "lightning_logs" / "version_0" / "summary.json").read_text())["rows"]
    assert rows["params (total)"]["recovered"] == rows["params (total)"]["pruned"]
