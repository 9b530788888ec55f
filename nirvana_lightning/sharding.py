"""Fully sharded training (FSDP2 through Lightning's ``ModelParallelStrategy``) of a pruned model.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 in torch 2.13 refuses to run without an
accelerator ("FSDP needs a non-CPU accelerator device"), and Lightning refuses ``strategy: fsdp`` with
``accelerator: cpu``, so nothing of it can be tested on a CPU machine. FSDP2 (``fully_shard``) runs on
CPU processes over gloo, shards each parameter as a ``DTensor`` (frozen and trainable parameters may
share a unit, so LoRA needs no ``use_orig_params``), and is PyTorch's supported path. Lightning's
``ModelParallelStrategy`` leaves the wrapping to ``LightningModule.configure_model``, which is where
:meth:`NirvanaModule.configure_model` calls :func:`shard_model` after pruning and LoRA.

Order of a sharded run: ``setup`` loads the dense model on rank 0 (host memory; the other ranks build
it on the meta device and read no weight) and the pruning callback scores it on rank 0 and cuts it on
every rank (the broadcast plan; a meta model is cut by shape); ``configure_model`` attaches LoRA, shards
each decoder layer and the root, and fills every rank's shards from rank 0 (:func:`load_from_rank_zero`),
so each rank keeps 1/N of the pruned weights; the precision plugin and optimizers come after. Code that runs the model outside ``training_step`` goes through the
root module's forward, which gathers each unit's parameters in turn (FSDP2's hooks), so the evaluation
callbacks need no change; the export gathers a full state dict on rank 0 (:func:`full_state_dict`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .families import get_family


def is_sharded(strategy) -> bool:
    """Whether parameters are split across processes (FSDP1/2, DeepSpeed): no rank holds the whole model."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy))


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, LM head and anything left)."""
    from torch.distributed.fsdp import fully_shard

    for layer in get_family(model).layers():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def load_from_rank_zero(model: nn.Module, full: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                        device: torch.device) -> None:
    """Fill every rank's shards from rank 0's full state (a collective).

    Rank 0 passes its full (unsharded, pruned, LoRA-attached) state; the others pass ``{}``: their model
    was built on the meta device, is materialised empty here and receives its shards by broadcast.
    ``buffers`` (rank 0's, broadcast by the caller) fill the non-persistent buffers a state dict leaves
    out (RoPE ``inv_freq``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in model.parameters()) or any(b.is_meta for b in model.buffers()):
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = value.to(device)


def is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0, gathered unit by unit into host memory (empty on other ranks).

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_strategy(strategy, callbacks=()) -> None:
    """Refuse what this project cannot run right under a sharded strategy, before any weight is loaded.

    * ``FSDPStrategy`` (FSDP1) and ``DeepSpeedStrategy``: they wrap the LightningModule, so code that runs
      ``pl_module.model`` outside ``training_step`` (evaluation callbacks, the export) would see flat shards,
      and neither can be run here (no accelerator) to prove otherwise. ``ModelParallelStrategy`` (FSDP2)
      is the supported way to shard.
    * Rank-0-only work on a sharded model: ``LmEvalCallback`` (lm-eval runs in one process, the other ranks
      would wait in the forward's collectives forever) and the summary's speed measurement (it times the
      unwrapped model, which would bypass the gathering).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from .errors import ConfigError

    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ConfigError("trainer.strategy", type(strategy).__name__,
                          "ModelParallelStrategy (FSDP2; data_parallel_size: <processes>, tensor_parallel_size: 1) "
                          "to shard, or ddp: FSDP1 and DeepSpeed wrap the whole module, which the evaluation "
                          "callbacks and the export do not go through")
    if not is_sharded(strategy):
        return
    for callback in callbacks:
        name = type(callback).__name__
        if name == "LmEvalCallback":
            raise ConfigError("trainer.callbacks", name, "no LmEvalCallback under a sharded strategy (lm-eval runs on "
                              "rank 0 alone; the other ranks would hang): evaluate the export with lm-eval instead")
        if name == "RunSummaryCallback" and getattr(callback, "speed", False):
            raise ConfigError("RunSummaryCallback.speed", True, "false under a sharded strategy (the timed forward "
                              "would bypass the gathering of shards); measure the export's speed instead")


#: strategy names Lightning resolves to FSDP1 / DeepSpeed (refused, see :func:`check_strategy`)
_WRAPPING = ("fsdp", "deepspeed")


def device_count(devices) -> int | None:
    """``trainer.devices`` as written (``2``, ``"2"``, ``[0, 1]``) as a process count; None for ``auto`` / ``-1``."""
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices
    devices = len(devices) if isinstance(devices, (list, tuple)) else devices
    return devices if isinstance(devices, int) and devices >= 0 else None


def check_strategy_config(strategy, devices, num_nodes=1) -> None:
    """The strategy as written in the config, refused before Lightning builds it or any rank starts.

    Lightning's own refusals (FSDP1 or DeepSpeed on a CPU, a missing package) and a process mesh that does
    not fit the devices (ModelParallelStrategy's ``data_parallel_size x tensor_parallel_size`` against
    ``devices x num_nodes``: every rank would raise after start-up) become one ConfigError.

    Args:
        strategy: ``trainer.strategy``: a name, or a ``{class_path, init_args}`` mapping / namespace.
        devices, num_nodes: ``trainer.devices`` / ``trainer.num_nodes`` as written (``auto`` is not checked).
    """
    from .errors import ConfigError

    name, init = strategy, {}
    if hasattr(strategy, "class_path") or isinstance(strategy, dict):
        get = strategy.get if isinstance(strategy, dict) else lambda k, d=None: getattr(strategy, k, d)
        name = str(get("class_path", "")).rsplit(".", 1)[-1]
        init = get("init_args") or {}
        init = dict(init) if isinstance(init, dict) else vars(init)
    if not isinstance(name, str):
        return
    low = name.lower()
    if low.startswith(_WRAPPING) or low in ("fsdpstrategy", "deepspeedstrategy"):
        raise ConfigError("trainer.strategy", name,
                          "ddp, or lightning.pytorch.strategies.ModelParallelStrategy (FSDP2; data_parallel_size: "
                          "<processes>, tensor_parallel_size: 1) to shard: FSDP1 and DeepSpeed wrap the whole "
                          "module, which the evaluation callbacks and the export do not go through")
    if low != "modelparallelstrategy":
        return
    tp = init.get("tensor_parallel_size", "auto")
    if isinstance(tp, int) and tp != 1:
        raise ConfigError("trainer.strategy.init_args.tensor_parallel_size", tp,
                          "1 (layers of per-layer widths are sharded with FSDP2, not split by tensor "
                          "parallelism; set data_parallel_size to the number of processes)")
    dp = init.get("data_parallel_size", "auto")
    devices = device_count(devices)
    nodes = num_nodes if isinstance(num_nodes, int) else 1
    if isinstance(dp, int) and isinstance(devices, int) and dp * (tp if isinstance(tp, int) else 1) != devices * nodes:
        raise ConfigError("trainer.devices", devices,
                          f"{dp // nodes if dp % nodes == 0 else dp} per node: ModelParallelStrategy's "
                          f"data_parallel_size={dp} x tensor_parallel_size=1 must equal devices x num_nodes "
                          f"({devices} x {nodes}); change both together")


#: torch.distributed calls that need every rank: inside a rank-0 region they would wait forever (NCCL: until
#: the process group's timeout) or pair with an unrelated collective of the other ranks
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all", "barrier",
               "broadcast", "broadcast_object_list", "gather", "gather_object", "monitored_barrier", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list")


class CollectiveInRankZeroRegion(RuntimeError):
    """A collective was called inside :func:`on_rank_zero`'s ``make`` (only rank 0 runs it)."""


@contextlib.contextmanager
def forbid_collectives(what: str, strategy=None):
    """Make every collective raise :class:`CollectiveInRankZeroRegion` while the block runs (on this process).

    Covers ``torch.distributed``'s collectives (module attributes and the c10d module's own names, which
    ``broadcast_object_list`` and friends call) and the Lightning strategy's ``broadcast`` / ``barrier`` /
    ``all_gather`` / ``reduce`` (``trainer.log_dir`` is such a broadcast).
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    def refuse(name):
        def call(*_args, **_kwargs):
            raise CollectiveInRankZeroRegion(
                f"{name}() called inside the rank-0 region of {what}: only rank 0 runs it, so the other ranks "
                "would never join the collective (read such values before the region, or after its broadcast)")
        return call

    missing = object()
    patched = []  # (owner, name, what to restore: the module attribute, or the instance's own / missing)
    for owner in (dist, distributed_c10d):
        patched += [(owner, name, getattr(owner, name)) for name in COLLECTIVES if hasattr(owner, name)]
    if strategy is not None:
        patched += [(strategy, name, vars(strategy).get(name, missing))
                    for name in ("broadcast", "barrier", "all_gather", "reduce") if hasattr(strategy, name)]
    try:
        for owner, name, _ in patched:
            prefix = "strategy" if owner is strategy else "torch.distributed"
            setattr(owner, name, refuse(f"{prefix}.{name}"))
        yield
    finally:
        for owner, name, original in reversed(patched):
            if original is missing:  # the instance attribute shadowed the class's method: remove it
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, original)


def on_rank_zero(trainer, make, *, what: str):
    """``make()`` on global rank 0 only, its (picklable) result broadcast to every rank (a collective).

    ``make`` may not call a collective (``trainer.log_dir`` included): while it runs, every collective raises
    :class:`CollectiveInRankZeroRegion` on rank 0 at once, and that error reaches every rank through the one
    broadcast below, so a hidden collective fails loudly everywhere instead of hanging. An exception on
    rank 0 is sent to the others, so no rank waits forever; rank 0 re-raises its own, the others raise a
    RuntimeError naming it (a ConfigError keeps its key, value and choices).
    """
    from .errors import ConfigError

    if trainer.world_size <= 1:
        with forbid_collectives(what, trainer.strategy):  # the same rule single-process: found before a DDP run
            return make()
    payload, error = None, None
    if trainer.global_rank == 0:
        try:
            with forbid_collectives(what, trainer.strategy):
                payload = {"value": make()}
        except ConfigError as err:
            error, payload = err, {"config_error": [err.key, err.value, err.expected]}
        except Exception as err:  # noqa: BLE001 - sent to the other ranks, then re-raised here
            error, payload = err, {"error": f"{type(err).__name__}: {err}"}
    payload = trainer.strategy.broadcast(payload, src=0)
    if error is not None:
        raise error
    if "config_error" in payload:
        raise ConfigError(*payload["config_error"])
    if "error" in payload:
        raise RuntimeError(f"{what} failed on rank 0: {payload['error']}")
    return payload["value"]
