"""LightningCLI wiring: ``python -m nirvana_lightning fit --config configs/<file>.yaml``."""

from __future__ import annotations

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
        if ckpt_path and checkpoint_file(ckpt_path).is_file():
            try:
                saved = load_checkpoint(checkpoint_file(ckpt_path), mmap=True).get("hyper_parameters") or {}
            except ValueError as err:
                raise ConfigError("ckpt_path", ckpt_path, f"a readable checkpoint of this run ({err})") from None
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
            self.model.resume_ckpt_path = ckpt_path

    def before_fit(self) -> None:
        self._remember_checkpoint()

    def before_validate(self) -> None:
        self._remember_checkpoint()

    def before_test(self) -> None:
        self._remember_checkpoint()


def entry() -> None:
    """The ``nirvana-lightning`` command and ``python -m nirvana_lightning``: a bad setting ends with one line.

    The :class:`ConfigError` names the key, the bad value and the valid choices; exit status 2.
    """
    import sys

    try:
        main()
    except ConfigError as err:
        print(f"nirvana-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)


def main(args: list[str] | None = None, run: bool = True) -> NirvanaCLI:
    """Entry point; ``args`` and ``run=False`` serve tests."""
    return NirvanaCLI(
        NirvanaModule,
        NirvanaDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
