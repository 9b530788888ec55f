"""The lm-eval bridge on in-memory tiny models: the offline task, name checks and the callback in a fit."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

pytest.importorskip("lm_eval")

from nirvana_lightning.callbacks.lm_eval import LmEvalCallback  # noqa: E402
from nirvana_lightning.debug_models import build_tiny_model  # noqa: E402
from nirvana_lightning.errors import ConfigError  # noqa: E402
from nirvana_lightning.eval.lm_eval import OFFLINE_TASKS, run_lm_eval, validate_tasks  # noqa: E402

TASK = "nirvana_brown_cloze"


def test_offline_task_files_are_shipped_and_well_formed():
    yaml_path = OFFLINE_TASKS[TASK]
    for name in ("nirvana_brown_cloze_test.jsonl", "nirvana_brown_cloze_fewshot.jsonl"):
        path = yaml_path.parent / name
        assert path.stat().st_size < 200_000
        items = [json.loads(line) for line in path.read_text().splitlines()]
        assert all(len(i["choices"]) == 4 and 0 <= i["label"] < 4 and i["prefix"] for i in items)
    assert len(items) == 16 and len([*open(yaml_path.parent / "nirvana_brown_cloze_test.jsonl")]) == 200


def test_run_lm_eval_in_memory(smollm2_tokenizer):
    model = build_tiny_model("tiny-llama", vocab_size=len(smollm2_tokenizer))
    model.train()
    model.model.layers[0].eval()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    results = run_lm_eval(model, smollm2_tokenizer, [TASK], limit=12, batch_size=16)
    metrics = results[TASK]
    assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_before)  # lm-eval's seeding does not leak into training


def test_run_lm_eval_accepts_a_peft_model(smollm2_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model("tiny-llama", vocab_size=len(smollm2_tokenizer))
    plain = run_lm_eval(base, smollm2_tokenizer, [TASK], limit=4, batch_size=16)
    # LoRA B starts at zero: the wrapped model computes the same function
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped = run_lm_eval(peft_model, smollm2_tokenizer, [TASK], limit=4, batch_size=16)
    assert wrapped[TASK]["acc"] == pytest.approx(plain[TASK]["acc"])
    assert wrapped[TASK]["acc_norm"] == pytest.approx(plain[TASK]["acc_norm"])


def test_unknown_task_names_the_key():
    with pytest.raises(ConfigError) as err:
        validate_tasks([TASK, "hellaswagg"], "eval.tasks")
    assert err.value.key == "eval.tasks[1]" and err.value.value == "hellaswagg"
    assert TASK in str(err.value) and "hellaswag" in str(err.value)
    assert validate_tasks([TASK, "hellaswag", "arc_easy"], "eval.tasks") == [TASK, "hellaswag", "arc_easy"]
    with pytest.raises(ConfigError):
        validate_tasks([], "eval.tasks")


@pytest.mark.parametrize("kwargs, key", [
    (dict(every_n_steps=0), "LmEvalCallback.every_n_steps"),
    (dict(limit=0), "LmEvalCallback.limit"),
    (dict(num_fewshot=-1), "LmEvalCallback.num_fewshot"),
    (dict(batch_size=0), "LmEvalCallback.batch_size"),
    (dict(tasks=[TASK, "no_such_task"]), "LmEvalCallback.tasks[1]"),
])
def test_callback_rejects_bad_settings(kwargs, key):
    with pytest.raises(ConfigError) as err:
        LmEvalCallback(**kwargs)
    assert err.value.key == key


class _Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.logged: dict[str, tuple[float, int]] = {}

    name, version = "recorder", 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.logged.update({k: (v, step) for k, v in metrics.items()})


def test_callback_in_a_fit(tmp_path):
    from nirvana_lightning.callbacks.pruning import NirvanaPruningCallback
    from nirvana_lightning.data import NirvanaDataModule
    from nirvana_lightning.module import NirvanaModule
    from nirvana_lightning.pruning.settings import Calibration, PruningTarget

    L.seed_everything(0)
    module = NirvanaModule(source="tiny-llama", recovery="full", lr=1e-2, warmup_steps=1)
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=16, max_val_windows=2,
                             batch_size=2)
    lm_eval_cb = LmEvalCallback(limit=4, batch_size=16, every_n_steps=2, dense=True)
    pruning = NirvanaPruningCallback(target=PruningTarget(sparsity=0.4, gamma=2.0, round_to=8),
                                     calibration=Calibration(samples=4, seq_len=16))
    logger = _Recorder()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[lm_eval_cb, pruning])
    trainer.fit(module, datamodule=data)

    assert list(lm_eval_cb.results) == ["dense", "pruned", "step_2", "recovered"]
    for stage, metrics in lm_eval_cb.results.items():
        assert {m.split("/")[0] for m in metrics} == {TASK}, stage
        assert 0.0 <= metrics[f"{TASK}/acc"] <= 1.0 and 0.0 <= metrics[f"{TASK}/acc_norm"] <= 1.0
    assert logger.logged[f"lm_eval/{TASK}/acc/recovered"] == (lm_eval_cb.results["recovered"][f"{TASK}/acc"], 3)
    assert logger.logged[f"lm_eval/{TASK}/acc"][1] == 3  # the curve: its last point is the fit-end value
    assert f"{TASK} acc" in lm_eval_cb.summary_rows() and f"{TASK} acc_stderr" not in lm_eval_cb.summary_rows()
    assert f"| {TASK} acc |" in lm_eval_cb.table()

    restored = LmEvalCallback()
    restored.load_state_dict(lm_eval_cb.state_dict())
    assert restored.results == lm_eval_cb.results


def test_dense_after_pruning_is_an_error(tmp_path):
    from nirvana_lightning.callbacks.pruning import NirvanaPruningCallback
    from nirvana_lightning.data import NirvanaDataModule
    from nirvana_lightning.module import NirvanaModule
    from nirvana_lightning.pruning.settings import Calibration, PruningTarget

    module = NirvanaModule(source="tiny-llama", recovery="full")
    data = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, max_train_windows=8, max_val_windows=1,
                             batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[NirvanaPruningCallback(target=PruningTarget(sparsity=0.4, gamma=2.0, round_to=8),
                                                          calibration=Calibration(samples=4, seq_len=16)),
                                   LmEvalCallback(limit=4, dense=True)])
    with pytest.raises(ConfigError, match="listed first"):
        trainer.fit(module, datamodule=data)
