"""Recovery objectives from hidden states: equal to the model's own loss, and no (B, T, V) logits in memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.eval.kl import target_mask, token_kl
from nirvana_lightning.recovery.objectives import distillation_loss, lm_loss


def _batch(vocab, b=2, t=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    labels[1, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [5, 1024])
def test_lm_loss_equals_the_models_own_loss_and_gradient(family, chunk):
    model = build_tiny_model(family)
    batch = _batch(model.config.vocab_size)
    want = model(**batch).loss
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got, n = lm_loss(model, batch, chunk=chunk)
    got.backward()
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_distillation_equals_full_logit_formula(alpha):
    student = build_tiny_model("tiny-llama", seed=1)
    teacher = build_tiny_model("tiny-llama", seed=2)
    batch = _batch(student.config.vocab_size)
    tau = 2.0
    out = student(**batch)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kl, n = token_kl(t_logits, out.logits, target_mask(batch), temperature=tau)
    want = alpha * kl / n * tau ** 2 + (1 - alpha) * out.loss
    want.backward()
    want_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    got = distillation_loss(student, teacher, batch, temperature=tau, alpha=alpha, chunk=7)
    got["loss"].backward()
    assert got["n_token"] == n and (got["lm"] is None) == (alpha == 1.0)
    torch.testing.assert_close(got["loss"], want, rtol=1e-5, atol=1e-6)
    for name, g in _grads(student).items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


class _Largest(TorchDispatchMode):
    """The largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_logits_in_forward_or_backward():
    vocab, b, t, chunk = 4096, 2, 64, 16
    student = build_tiny_model("tiny-llama", vocab_size=vocab, seed=1)
    teacher = build_tiny_model("tiny-llama", vocab_size=vocab, seed=2)
    batch = _batch(vocab, b, t)
    weights = max(p.numel() for p in student.parameters())
    with _Largest() as probe:
        lm_loss(student, batch, chunk=chunk)[0].backward()
    assert probe.largest <= max(weights, chunk * vocab) < b * t * vocab
    with _Largest() as probe:
        distillation_loss(student, teacher, batch, chunk=chunk)["loss"].backward()
    assert probe.largest <= max(weights, chunk * vocab) < b * t * vocab
