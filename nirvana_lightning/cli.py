"""LightningCLI wiring: ``python -m nirvana_lightning fit --config configs/<file>.yaml``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data import NirvanaDataModule
from .module import NirvanaModule


class NirvanaCLI(LightningCLI):
    """LightningCLI with one model source shared by the model and the tokenizer of the data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.source", "data.tokenizer")
        parser.link_arguments("model.cache_dir", "data.cache_dir")

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


def main(args: list[str] | None = None, run: bool = True) -> NirvanaCLI:
    """Entry point; ``args`` and ``run=False`` serve tests."""
    return NirvanaCLI(
        NirvanaModule,
        NirvanaDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
