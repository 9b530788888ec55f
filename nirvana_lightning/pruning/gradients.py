"""The scoring pass: forward/backward over calibration windows, reduced to unit scores on the fly.

Memory: with ``lean=True`` every block weight's gradient is reduced to its unit scores by a
post-accumulate-grad hook the moment it is complete, then freed, so at most one block gradient
is alive at a time. The LM head is applied in vocabulary chunks for the NIRVANA functionals, so
the full ``(B, T, V)`` logits are never materialised (``taylor`` uses the model's ordinary loss).

Micro-batches and the absolute value: S = |w * sum_b grad_b| takes the absolute value AFTER the
batch sum (the released semantics). Scoring the calibration in one pass (the default) is exact
and lean. With several micro-batches, ``accumulate="gradient"`` (default) keeps the block
gradients across micro-batches, which is exact but holds them all (like the released code);
``accumulate="saliency"`` sums |w * grad_mb| per micro-batch instead: lean, but an upper bound of
the exact score (triangle inequality) that differs from the released semantics.

Precision: ``compute_dtype=torch.float32`` scores a bf16/fp16 model in float32 without converting
it. Each module is given float32 copies of its parameters only while it runs (inside the
checkpointed layer forward, so backward recomputes them), the residual stream is float32 from the
embedding output on, and every block weight's float32 gradient is reduced the moment autograd
produces it. The model's parameters are never touched: peak memory is the half-precision model
plus one layer's float32 copy and its gradients, and an error half-way (out of memory) leaves the
model exactly as it was. Upcasting the whole model instead costs 2x its size (33 GiB for an 8B
model in bf16) and was the 0.1 behaviour.

Offload: ``compute_device`` (e.g. ``cuda:0`` for a model in host memory) runs every module there on
copies made the same way, one layer at a time, so the accelerator holds one layer's parameters, the
layer-boundary hidden states and one layer's recomputed activations, never the model. Copies imply
activation checkpointing (``checkpointing=False`` is not honoured then).

Both bounds hold for one calibration pass (the default) and for ``accumulate="saliency"``. With several
micro-batches and ``accumulate="gradient"``, or ``lean=False``, the float32 gradient of every block
weight is kept until the last batch (2x the bf16 block weights; in host memory when offloading), as
the exact released semantics require.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_choice
from ..families import ModelFamily, get_family, unwrap_model
from .saliency import (
    CRITERIA,
    FUNCTIONALS,
    compute_output_functional,
    compute_weight_saliency,
    flap_saliency,
    reduce_owned,
    wanda_saliency,
)
from .settings import ACCUMULATE, PruningTarget, Scoring

_SCORING, _TARGET = Scoring(), PruningTarget()  # the defaults below are the typed settings' own


@dataclass
class UnitScores:
    """Per unit kind (the family's names: ``kv_group``, ``neuron``, ``q_head`` at ``query_head`` granularity, T5's
    ``cross_head``), per layer, the scores of that layer's units (layers may differ in width after pruning; a kind
    a layer lacks has 0 units there), float32; ``kinds``: what the family declares of each kind
    (:meth:`~nirvana_lightning.families.UnitKind.spec`)."""

    by_kind: dict[str, list[torch.Tensor]]
    kinds: dict[str, dict]

    @property
    def granularity(self) -> str:
        return "query_head" if any(spec["parent"] for spec in self.kinds.values()) else "group"

    def as_groups(self) -> UnitScores:
        """The ``group`` granularity scores of the same pass: a parent unit's score is its own part plus its
        children's (every saliency is a sum over weights, so the parts add up exactly; the criterion ``random``
        aside)."""
        by_kind = {name: list(per_layer) for name, per_layer in self.by_kind.items() if not self.kinds[name]["parent"]}
        for name, spec in self.kinds.items():
            if spec["parent"]:
                by_kind[spec["parent"]] = [own + kids.reshape(own.numel(), -1).sum(1) if own.numel() else own
                                           for own, kids in zip(by_kind[spec["parent"]], self.by_kind[name])]
        return UnitScores(by_kind, {name: spec for name, spec in self.kinds.items() if name in by_kind})


def as_batches(calibration: torch.Tensor | Iterable[torch.Tensor], micro_batch_size: int | None) -> list[torch.Tensor]:
    """Normalise calibration to a list of ``(B, T)`` LongTensors."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ConfigError("calibration", f"tensor {tuple(calibration.shape)} {calibration.dtype}",
                              "a LongTensor of token ids (N, T) or an iterable of such batches")
        if calibration.numel() == 0:
            raise ConfigError("calibration", f"tensor of shape {tuple(calibration.shape)}",
                              "at least one window of at least one token")
        return list(calibration.split(micro_batch_size)) if micro_batch_size else [calibration]
    batches = []
    for b in calibration:
        if isinstance(b, dict):
            mask = b.get("attention_mask")
            if mask is not None and not bool(mask.all()):
                raise ConfigError("calibration", "a padded batch", "full windows without padding (pack the text, "
                                  "e.g. NirvanaDataModule.calibration_windows)")
            b = b["input_ids"]
        batches.extend(as_batches(b, micro_batch_size))
    if not batches:
        raise ConfigError("calibration", "an empty iterable", "at least one batch of token ids")
    return batches


def check_token_ids(batches: list[torch.Tensor], n_vocab: int) -> None:
    """Token ids must index the vocabulary: refuse negative or too large ids before any forward pass."""
    low = min(int(b.min()) for b in batches)
    high = max(int(b.max()) for b in batches)
    if low < 0 or high >= n_vocab:
        raise ConfigError("calibration", f"token ids in [{low}, {high}]",
                          f"ids in [0, {n_vocab - 1}] (the model's vocabulary; the same tokenizer as the model?)")


def fingerprint(batches: list[torch.Tensor]) -> str:
    """sha256 (first 16 hex digits) of the calibration token ids, for provenance."""
    h = hashlib.sha256()
    for b in batches:
        h.update(b.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _UpcastCapture(torch.autograd.Function):
    """``weight.to(device, dtype)`` whose backward hands the gradient (in ``dtype``) to ``sink`` instead of the weight.

    ``anchor`` is a scalar leaf that makes the output require grad although the weight does not, so
    no half-precision ``.grad`` is ever allocated and nothing large is saved for backward (the
    copy is recomputed by the checkpointed forward).
    """

    @staticmethod
    def forward(ctx, weight, anchor, device, dtype, sink):
        ctx.sink = sink
        return weight.detach().to(device=device, dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        ctx.sink(grad)
        return None, None, None, None, None


@contextmanager
def _parameters_as(module: nn.Module, make, device: torch.device) -> Iterable[None]:
    """Let ``module`` (and its children) see ``make(p)`` instead of each parameter ``p`` while inside,
    and its buffers on ``device``."""
    saved = []
    for sub in module.modules():
        for store, convert in ((sub._parameters, make), (sub._buffers, lambda b: b.to(device))):
            for name, t in list(store.items()):
                if t is not None:
                    saved.append((store, name, t))
                    store[name] = convert(t)
    try:
        yield
    finally:
        for store, name, t in saved:
            store[name] = t


@contextmanager
def _computed_in(model: nn.Module, family, device: torch.device, dtype: torch.dtype,
                 sinks: dict[int, object]) -> Iterable[None]:
    """Run the model's forward on ``device`` in ``dtype`` without converting or moving it (see the module doc).

    Enter it before :meth:`ModelFamily.checkpointed_layers`, which then wraps these forwards, so
    each layer's copies are made (and remade in backward) inside its checkpointed region. ``sinks`` maps ``id(weight)`` to the callback that
    receives that weight's gradient (on ``device``, in ``dtype``).
    """
    anchor = torch.zeros((), requires_grad=True)

    def make(p: nn.Parameter) -> torch.Tensor:
        sink = sinks.get(id(p))
        if sink is None:
            return p.detach().to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
        return _UpcastCapture.apply(p, anchor, device, dtype, sink)

    def wrap(module: nn.Module) -> None:
        forward = module.forward  # the checkpointing wrapper for layers: copies are made inside it

        def run(*args, _module=module, _forward=forward, **kwargs):
            with _parameters_as(_module, make, device):
                return _forward(*args, **kwargs)

        module.forward = run

    layers = family.layers()
    embedding = model.get_input_embeddings()
    inside = {id(m) for layer in layers for m in layer.modules()} | {id(m) for m in embedding.modules()}
    # modules outside the layers that hold parameters (final norm, LM head), outermost only
    others, covered = [], set()
    layer_ids = {id(layer) for layer in layers}
    for m in model.modules():
        if id(m) in inside or id(m) in covered or not any(True for _ in m.parameters(recurse=False)):
            continue
        if any(id(x) in layer_ids for x in m.modules()):
            raise NotImplementedError(f"{type(m).__name__} holds parameters and contains decoder layers: "
                                      "score this family with scoring.dtype 'model' or convert it to float32 first")
        others.append(m)
        covered |= {id(x) for x in m.modules()}
    wrapped = [*layers, *others]
    saved = [m.__dict__.get("forward") for m in wrapped]
    for m in wrapped:
        wrap(m)
    handle = embedding.register_forward_hook(lambda _m, _inp, out: out.to(device=device, dtype=dtype))
    try:
        yield
    finally:
        handle.remove()
        for m, previous in zip(wrapped, saved):
            if previous is None:
                del m.forward
            else:
                m.forward = previous


def _chunked_head_functional(hidden: torch.Tensor, head: nn.Linear, functional: str, chunk: int,
                             finalize=None) -> None:
    """Backpropagate f(finalize(head(hidden))) into ``hidden.grad`` one vocabulary chunk at a time.

    ``hidden`` is a detached leaf ``(B, T, H)`` that requires grad; ``finalize`` is the family's step from
    head outputs to logits (soft-capping; elementwise and increasing). Equals autograd through the
    full logits for ``max_over_seq`` and ``sum_logits`` (separable over the vocabulary); for
    ``max_over_vocab`` the arg-max is found chunk-wise first (ties go to the first index).
    """
    finalize = finalize or (lambda x: x)
    weight, bias = head.weight, head.bias
    n_vocab = weight.shape[0]
    if functional in ("max_over_seq", "sum_logits"):
        for start in range(0, n_vocab, chunk):
            w = weight[start:start + chunk].to(hidden.device, hidden.dtype)
            b = None if bias is None else bias[start:start + chunk].to(hidden.device, hidden.dtype)
            logits = finalize(nn.functional.linear(hidden, w, b))  # (B, T, chunk)
            if functional == "max_over_seq":
                part = logits.amax(dim=1).float().sum() / (hidden.shape[0] * n_vocab)
            else:
                part = logits.float().sum()
            part.backward()
        return
    with torch.no_grad():
        best = torch.full(hidden.shape[:2], -torch.inf, device=hidden.device)
        arg = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        for start in range(0, n_vocab, chunk):
            logits = nn.functional.linear(hidden, weight[start:start + chunk].to(hidden.device, hidden.dtype),
                                          None if bias is None else
                                          bias[start:start + chunk].to(hidden.device, hidden.dtype)).float()
            value, index = logits.max(dim=2)
            better = value > best
            best = torch.where(better, value, best)
            arg = torch.where(better, index + start, arg)
    top = (hidden * weight[arg.to(weight.device)].to(hidden.device, hidden.dtype)).sum(-1)
    if bias is not None:
        top = top + bias[arg.to(bias.device)].to(hidden.device, hidden.dtype)
    finalize(top).float().mean().backward()  # increasing: the arg-max of the raw logits is the logits' own


def input_statistics(model: nn.Module, family, batches: list[torch.Tensor]) -> dict[int, tuple[int, torch.Tensor, torch.Tensor]]:
    """One forward-only pass: per block linear (by ``id``), ``(tokens, sum of inputs, sum of squared inputs)``
    per input channel, accumulated in float64 (float32 on MPS) on the model's device."""
    device = next(model.parameters()).device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    stats: dict[int, list] = {}

    def hook(module, inputs, _output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(acc_dtype)
        entry = stats.setdefault(id(module), [0, 0.0, 0.0])
        entry[0] += x.shape[0]
        entry[1] = entry[1] + x.sum(0)
        entry[2] = entry[2] + (x * x).sum(0)

    handles = [lin.register_forward_hook(hook) for _, _, lin in family.block_linears()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                family.hidden_states(batch.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: (v[0], v[1], v[2]) for k, v in stats.items()}


def compute_unit_scores(
    model: nn.Module,
    calibration: torch.Tensor | Iterable[torch.Tensor],
    *,
    criterion: str = _SCORING.criterion,
    functional: str = _SCORING.functional,
    micro_batch_size: int | None = None,
    accumulate: str = _SCORING.accumulate,
    lean: bool = True,
    checkpointing: bool = _SCORING.checkpointing,
    head_chunk: int | None = 8192,
    seed: int = _SCORING.seed,
    compute_dtype: torch.dtype | None = None,
    compute_device: torch.device | str | None = None,
    granularity: str = _TARGET.attention_granularity,
    family: ModelFamily | None = None,
) -> UnitScores:
    """Score every attention group and MLP neuron of ``model`` (weights are not modified).

    Args:
        model: a supported causal LM (peft wrappers are looked through).
        calibration: LongTensor ``(N, T)`` or an iterable of ``(B, T)`` batches.
        criterion: ``nirvana`` | ``magnitude`` | ``taylor`` | ``random`` | ``wanda_sp`` (|w| x input norm) |
            ``flap`` (input fluctuation); both from one forward pass, on the input channels of o_proj and
            down_proj, as in FLAP's reference code.
        functional: output functional for ``nirvana`` (see :data:`FUNCTIONALS`).
        micro_batch_size: split a tensor calibration into micro-batches of this size.
        accumulate: ``gradient`` (exact) or ``saliency`` (lean with micro-batches); see module doc.
        lean: reduce each gradient as soon as it is complete (False: keep all, then reduce; the
            straightforward baseline the memory benchmark compares against).
        checkpointing: recompute layer activations in backward.
        head_chunk: vocabulary chunk for the NIRVANA functionals (None: full logits).
        seed: seed of the ``random`` criterion.
        compute_dtype: dtype of the forward/backward (None: the model's); float32 on a bf16/fp16 model
            casts one module at a time and never converts the model (see the module doc).
        compute_device: run the forward/backward there, one module at a time, with the model staying
            where it is (None: where the model is); e.g. a model in host memory scored on ``cuda``.
        granularity: ``group`` scores KV groups and neurons; ``query_head`` also scores each query head (its q
            rows and o columns), the KV group keeping its k and v rows (the family's unit kinds).
        family: the model's family spec when the caller already holds it (``make_plan`` asks once).

    Returns:
        :class:`UnitScores` in float32 on the CPU.
    """
    check_choice("criterion", criterion, CRITERIA)
    check_choice("functional", functional, FUNCTIONALS)
    check_choice("accumulate", accumulate, ACCUMULATE)
    if not lean and accumulate == "saliency":
        raise ConfigError("scoring.accumulate", accumulate, "'gradient' when lean=False (the baseline keeps every gradient)")
    model = unwrap_model(model)
    family = family or get_family(model)
    linears = list(family.block_linears())
    kinds = [family.unit_kinds(layer, granularity) for layer in family.layers()]
    owners: dict[tuple[int, str], list] = {}  # (layer, projection) -> the kinds owning parts of it
    for i, layer_kinds in enumerate(kinds):
        for name, kind in layer_kinds.items():
            for o in kind.owns:
                owners.setdefault((i, o.role), []).append((name, kind.n_units, o))
    specs = {name: kind.spec() for k in kinds for name, kind in k.items()}
    home = next(model.parameters()).device
    device = torch.device(compute_device) if compute_device is not None else home  # where the maths runs
    names = list(dict.fromkeys(name for k in kinds for name in k))  # a kind some layers lack scores 0 units there
    scores = {name: [torch.zeros(k[name].n_units if name in k else 0, device=device) for k in kinds]
              for name in names}

    # each owned slice's sum is kept apart and the slices are added in the family's declared order at the end: the
    # order gradients arrive in (hooks, offloaded copies) never changes a score's rounding
    parts: dict[tuple[str, int, int], torch.Tensor] = {}

    def add(i: int, role: str, saliency: torch.Tensor, axis: int | None = None) -> None:
        for name, n_units, owned in owners[(i, role)]:
            if axis is None or owned.axis == axis:  # no sync per hook
                key = (name, i, kinds[i][name].owns.index(owned))
                part = reduce_owned(saliency, owned.axis, owned.block, owned.offset, n_units).to(device)
                parts[key] = parts[key] + part if key in parts else part

    def result() -> UnitScores:
        for (name, i, _), part in sorted(parts.items(), key=lambda item: item[0][2]):
            scores[name][i] += part
        return UnitScores({name: [s.cpu() for s in per_layer] for name, per_layer in scores.items()}, specs)

    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        return UnitScores({name: [torch.rand(s.numel(), generator=gen) for s in per_layer]
                           for name, per_layer in scores.items()}, specs)
    if criterion == "magnitude":
        for i, role, lin in linears:
            add(i, role, compute_weight_saliency(lin.weight, None))
        return result()

    batches = as_batches(calibration, micro_batch_size)
    if criterion in ("wanda_sp", "flap"):
        stats = input_statistics(model, family, batches)
        for i, role, lin in linears:
            if not any(owned.axis == 1 for _, _, owned in owners[(i, role)]):
                continue  # both score the output projections' input channels only
            count, total, sq = stats[id(lin)]
            if criterion == "wanda_sp":
                add(i, role, wanda_saliency(lin.weight, sq), axis=1)
            else:
                add(i, role, flap_saliency(lin.weight, total / count, sq / count), axis=1)
        return result()
    n_total = sum(b.shape[0] for b in batches)
    model_dtype = next(model.parameters()).dtype
    compute_dtype = compute_dtype or model_dtype
    upcast = compute_dtype != model_dtype or device != home  # copies per module (dtype, device or both)
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {p: p.grad for p in model.parameters()}
    was_training = model.training
    handles, state = [], {"active": accumulate == "saliency" and lean}
    held: dict[int, torch.Tensor] = {}  # upcast path: gradients kept until reduced (several batches, or not lean)
    sinks = {}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for i, role, lin in linears:
            if upcast:
                def sink(grad, _i=i, _role=role, _w=lin.weight):
                    if id(_w) in held:
                        grad = held.pop(id(_w)).to(grad.device) + grad
                    if state["active"]:
                        add(_i, _role, compute_weight_saliency(_w.to(grad.device), grad))
                    else:  # kept where the model is: offloaded scoring must not gather gradients on the device
                        held[id(_w)] = grad.to(home)
                sinks[id(lin.weight)] = sink
                continue
            lin.weight.requires_grad_(True)
            if lean:
                def hook(param, _i=i, _role=role):
                    if state["active"]:
                        add(_i, _role, compute_weight_saliency(param, param.grad))
                        param.grad = None
                handles.append(lin.weight.register_post_accumulate_grad_hook(hook))
        # the copies must be made inside each checkpointed region, so the casting wrapper goes on first
        with _computed_in(model, family, device, compute_dtype, sinks) if upcast else nullcontext(), \
                family.checkpointed_layers() if checkpointing or upcast else nullcontext():
            for n, batch in enumerate(batches):
                if n == len(batches) - 1 and lean:
                    state["active"] = True  # gradient mode: reduce only once the sum is complete
                ids = batch.to(home)  # the embedding lookup runs where the model is
                scale = 1.0 if functional == "sum_logits" and criterion == "nirvana" else ids.shape[0] / n_total
                if criterion == "taylor":
                    (family.lm_loss(ids) * scale).backward()
                elif head_chunk:
                    hidden = family.hidden_states(ids)
                    leaf = hidden.detach().requires_grad_(True)
                    _chunked_head_functional(leaf, family.lm_head(), functional, head_chunk, family.finalize_logits)
                    hidden.backward(leaf.grad * scale)
                    del hidden, leaf
                else:
                    logits = family.logits(ids)
                    (compute_output_functional(logits, functional) * scale).backward()
                    del logits
        if not lean:
            for i, role, lin in linears:
                grad = held.pop(id(lin.weight)).to(device) if upcast else lin.weight.grad
                add(i, role, compute_weight_saliency(lin.weight.to(grad.device), grad))
    finally:
        held.clear()
        for h in handles:
            h.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = saved_grads[p]
        model.train(was_training)
    return result()
