"""Data: text sources, packing, instruction templates, calibration windows and the datamodule."""

from .calibration import sample_windows
from .datamodule import NirvanaDataModule
from .sft import ALPACA_TEMPLATE, build_sft_example
from .sources import BUILTIN_SOURCES, read_records, validate_source_spec
from .text import leading_bos, pack_documents, split_documents, start_with_bos

__all__ = [
    "ALPACA_TEMPLATE", "BUILTIN_SOURCES", "NirvanaDataModule", "build_sft_example", "pack_documents",
    "leading_bos", "read_records", "sample_windows", "split_documents", "start_with_bos", "validate_source_spec",
]
