"""LightningCLI wiring: ``python -m nirvana_lightning fit --config configs/<file>.yaml``."""

from __future__ import annotations

from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from .data import NirvanaDataModule
from .errors import ConfigError
from .io import checkpoint_file, load_checkpoint
from .module import NirvanaModule


class NirvanaCLI(LightningCLI):
    """LightningCLI with one model source shared by the model and the tokenizer of the data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.source", "data.tokenizer")
        parser.link_arguments("model.cache_dir", "data.cache_dir")

    def _parse_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` written by a run of another model before Lightning adopts its settings.

        LightningCLI replaces the configured model arguments by the checkpoint's hyper-parameters, so a
        checkpoint of another model's run would silently swap ``model.source``. The file is read with
        ``weights_only`` (a corrupt or unsafe file is named in the error).
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).exists():
            raise ConfigError("ckpt_path", ckpt_path, "an existing checkpoint file (or a sharded checkpoint "
                              "directory), or last / best")
        if ckpt_path and Path(ckpt_path).is_dir() and not checkpoint_file(ckpt_path).is_file():
            raise ConfigError("ckpt_path", ckpt_path, "a checkpoint file (.ckpt) or a sharded checkpoint directory "
                              "holding meta.pt; this is a plain directory")
        if ckpt_path and checkpoint_file(ckpt_path).is_file():
            try:
                checkpoint = load_checkpoint(checkpoint_file(ckpt_path), mmap=True)
            except ValueError as err:
                raise ConfigError("ckpt_path", ckpt_path, f"a readable checkpoint of this run ({err})") from None
            missing = [k for k in ("state_dict", "hyper_parameters") if k not in checkpoint] \
                if not Path(ckpt_path).is_dir() else []
            if missing:
                raise ConfigError("ckpt_path", ckpt_path, f"a Lightning checkpoint written by nirvana-lightning (this "
                                  f"torch file has no {' / '.join(missing)}: keys {sorted(checkpoint)[:6]})")
            saved = checkpoint.get("hyper_parameters") or {}
            configured = self.config[sub]["model"].get("source") if self.config[sub].get("model") else None
            if "source" in saved and configured is not None and saved["source"] != configured:
                raise ConfigError("ckpt_path", ckpt_path,
                                  f"a checkpoint of a run with model.source={configured!r}; this one was written by "
                                  f"a run with model.source={saved['source']!r} (set model.source to that, or pick "
                                  "a checkpoint of this model)")
        super()._parse_ckpt_path()

    def _remember_checkpoint(self) -> None:
        """Tell the module which checkpoint will be restored, so it re-applies the saved plan at setup."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path:
            self.model.resume_from(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """Checks on the parsed config that Lightning would only make after starting ranks (or with its own
        traceback): the strategy against the accelerator and the device count."""
        from .sharding import check_strategy_config, device_count

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.get("trainer") or {}
        devices = trainer.get("devices")
        check_strategy_config(trainer.get("strategy"), devices, trainer.get("num_nodes", 1))
        n = device_count(devices) or 1
        recovery = (cfg.get("model") or {}).get("recovery")
        if self.subcommand == "fit" and recovery == "none" and n * (trainer.get("num_nodes") or 1) > 1:
            raise ConfigError("model.recovery", "none", "'lora' or 'full' with several processes (trainer.devices="
                              f"{devices}): nothing is trained, so DDP / FSDP2 would have no gradient to synchronise; "
                              "prune and evaluate in one process (trainer.devices: 1)")

    def before_fit(self) -> None:
        self._refuse_sft_for_encoder_decoders()
        self._remember_checkpoint()

    def _refuse_sft_for_encoder_decoders(self) -> None:
        """Instruction data for T5 fails here, before any model is loaded or pruned (the family refuses it too)."""
        if getattr(self.datamodule, "task", None) != "sft":
            return
        from transformers import AutoConfig

        from .families import FAMILIES
        from .loading import resolve_source

        source = self.model.hparams.source
        family = FAMILIES.get(AutoConfig.from_pretrained(resolve_source(source)).model_type)
        if family is not None and not family.sft_data:
            raise ConfigError("data.task", "sft", f"'lm' for model.source={source!r}, an encoder-decoder: its pairs "
                              "split packed windows at a fixed fraction (prefix -> continuation); instruction "
                              "examples would need a split at each response (not implemented)")

    def before_validate(self) -> None:
        self._remember_checkpoint()

    def before_test(self) -> None:
        self._remember_checkpoint()


def entry(args: list[str] | None = None) -> None:
    """The ``nirvana-lightning`` command and ``python -m nirvana_lightning``: a bad setting ends with one line.

    The last line of the output names the key, the bad value and the valid choices, whether the value was
    refused by our validation (:class:`ConfigError`, also from nested settings and callback ``init_args``)
    or by the argument parser (a type, an unknown or renamed key); exit status 2.
    """
    import sys

    argv = sys.argv[1:] if args is None else args
    try:
        check_command_line(argv)
        main(args)
    except Exception as err:  # noqa: BLE001 - only configuration errors are turned into one line
        line = explain(err, argv)
        if line is None:
            raise
        detail = str(err).strip()
        if detail and not isinstance(err, ConfigError) and detail not in line:
            print(detail, file=sys.stderr)  # the parser's own account, above the one line
        print(f"nirvana-lightning: error: {line}", file=sys.stderr)
        sys.exit(2)


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _config_paths(argv: list[str]) -> list[str]:
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return paths + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def check_command_line(argv: list[str]) -> None:
    """What the argument parser would report with a traceback, or with the wrong key, as a ConfigError.

    * no subcommand, or an unknown one;
    * in the ``--config`` files: a pruning-callback section (``target``, ``scoring``, ...) that is null or not
      a mapping, or holds a key its settings class does not have (jsonargparse reports the whole
      ``trainer.callbacks`` list instead of the key).
    """
    import dataclasses
    import difflib

    import yaml

    from .pruning.settings import RENAMED_KEYS, SECTIONS

    example = "e.g. python -m nirvana_lightning fit --config configs/quickstart.yaml"
    if not argv:
        raise ConfigError("subcommand", None, f"one of {list(SUBCOMMANDS)} ({example})")
    if argv[0] in ("-h", "--help"):
        return
    if argv[0] not in SUBCOMMANDS:
        raise ConfigError("subcommand", argv[0], f"one of {list(SUBCOMMANDS)}, first ({example})")
    for path in _config_paths(argv):
        try:
            config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue  # the parser names a missing or broken file itself
        config = config.get(argv[0], config) if isinstance(config, dict) else {}
        callbacks = ((config.get("trainer") or {}) if isinstance(config, dict) else {}).get("callbacks") or []
        for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
            if not (isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("NirvanaPruningCallback")):
                continue
            for section, cls in SECTIONS.items():
                init = cb.get("init_args") or {}
                if section not in init:
                    continue
                value = init[section]
                key = f"NirvanaPruningCallback.{section}"
                if key in RENAMED_KEYS and value is not None and not isinstance(value, dict):
                    continue  # a 0.1 flat value (schedule: linear): renamed_in_configs names its new key
                if not isinstance(value, dict):
                    raise ConfigError(key, value, f"a mapping of {cls.__name__} fields (omit {section} for its "
                                      f"defaults; in {path})")
                fields = [f.name for f in dataclasses.fields(cls)]
                for name in value:
                    if name not in fields:
                        close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.6)
                        hint = f"did you mean {key}.{close[0]}? " if close else ""
                        raise ConfigError(f"{key}.{name}", value[name],
                                          f"a key of {cls.__name__}: {hint}valid keys: {fields} (in {path})")


def renamed_in_configs(argv: list[str]) -> str | None:
    """The first 0.1 key in the ``--config`` files of ``argv`` (flat pruning-callback keys,
    ``data.calibration_*``), as ``old key -> new key`` text; None when there is none."""
    import yaml

    from .pruning.settings import RENAMED_KEYS, SECTIONS

    for path in _config_paths(argv):
        try:
            config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        config = config.get("fit", config) if isinstance(config, dict) else {}
        found = [f"data.{k}" for k in (config.get("data") or {}) if f"data.{k}" in RENAMED_KEYS]
        callbacks = (config.get("trainer") or {}).get("callbacks") or []
        for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
            if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("NirvanaPruningCallback"):
                for k, v in (cb.get("init_args") or {}).items():
                    old = f"NirvanaPruningCallback.{k}"
                    if old in RENAMED_KEYS and not (k in SECTIONS and isinstance(v, dict)):
                        found.append(old)
        if found:
            return f"{found[0]} (in {path}) is not a setting since 0.2; use {RENAMED_KEYS[found[0]]} (docs/configs.md)"
    return None


def _did_you_mean(owner: str | None, name: str) -> str:
    """A close valid key of the pruning callback (its nested settings included), as text."""
    import dataclasses
    import difflib
    import inspect

    from .callbacks import NirvanaPruningCallback
    from .pruning.settings import SECTIONS

    if owner != "NirvanaPruningCallback":
        return ""
    valid = [n for n in inspect.signature(NirvanaPruningCallback.__init__).parameters if n != "self"]
    valid += [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {owner}.{close[0]}?)" if close else ""


def explain(err: BaseException, argv: list[str] | None = None) -> str | None:
    """One line for a configuration error anywhere in ``err``'s chain, or None when it is not one.

    Our :class:`ConfigError` wins (jsonargparse wraps errors raised while it instantiates a callback in
    "Does not validate against any of the Union subtypes"); otherwise the argument parser's innermost
    message gives the key, the value and the expected type, and a 0.1 key names its new place.
    """
    import re

    from .pruning.settings import RENAMED_KEYS, SECTIONS

    chain = _chain(err)
    for e in chain:
        if isinstance(e, ConfigError):
            key = e.key
            if key.partition(".")[0] in SECTIONS or key in ("plan_path", "bias_compensation"):
                key = "NirvanaPruningCallback." + key
            return str(ConfigError(key, e.value, e.expected))
    if not any(isinstance(e, ArgumentError) or type(e).__name__ == "ArgumentError" for e in chain):
        return None
    renamed = renamed_in_configs(argv or [])
    if renamed is not None:
        return renamed
    text = "\n".join(str(e) for e in chain)
    missing = re.search(r'Parser key "config":\s*File does not exist: \'(.*?)\'', text)
    if missing:
        written = next((a for a in _config_paths(argv or []) if Path(a).resolve() == Path(missing[1])), missing[1])
        return f"--config={written!r} is invalid; expected an existing YAML file ({missing[1]} does not exist)"
    classes = re.findall(r"Problem with given class_path '([\w.]+)'", text)
    owner = classes[-1].rsplit(".", 1)[-1] if classes else None
    unknown = re.findall(r"Option '([\w.]+)' is not accepted", text) \
        or re.findall(r'No action for key "?\'?([\w.]+)', text) \
        or re.findall(r"Key \"([\w.]+)\" is not a", text) \
        or re.findall(r"unrecognized arguments: --([\w.]+)", text)
    if unknown:
        name = unknown[-1]
        key = f"{owner}.{name}" if owner else name
        if key in RENAMED_KEYS:
            return f"{key} is not a setting since 0.2; use {RENAMED_KEYS[key]} (docs/configs.md)"
        return f"{key} is not a setting{_did_you_mean(owner, name)}; see docs/configs.md for the valid keys"
    keys = re.findall(r'Parser key "([\w.\[\]]+)"', text)
    given = re.findall(r"(?:Given value|Got value): (.*)", text)
    expected = re.findall(r"Expected a (?:<class '(\w+)'>|typing\.Literal\[(.*?)\]|(\S+))", text)
    if not keys:
        return None
    inner = keys[-1]
    key = f"{owner}.{inner}" if owner and inner != "trainer.callbacks" else inner
    if key in RENAMED_KEYS:  # a 0.1 flat value where a section now stands (schedule: linear)
        return f"{key} is not a setting since 0.2; use {RENAMED_KEYS[key]} (docs/configs.md)"
    value = given[-1].strip() if given else "?"
    kinds = []
    for cls, literal, other in expected:
        kind = (cls or (f"one of: {literal}" if literal else other)).replace("NoneType", "null")
        if kind not in kinds:
            kinds.append(kind)
    want = " or ".join(kinds) if kinds else "a value of the declared type"
    return f"{key}={value!r} is invalid; expected {want}"


def main(args: list[str] | None = None, run: bool = True) -> NirvanaCLI:
    """Entry point; ``args`` and ``run=False`` serve tests."""
    strict = {"exit_on_error": False}  # parse errors are raised, so entry() can end them with one line
    return NirvanaCLI(
        NirvanaModule,
        NirvanaDataModule,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**strict, **{sub: dict(strict) for sub in NirvanaCLI.subcommands()}},
        args=args,
        run=run,
    )
