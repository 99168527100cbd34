"""Read adapters in every supported format, fold them exactly, write stock PEFT LoRA.

    from nora_serve.converters import convert_adapter, read_adapter, detect_format, AdapterError
"""

from .errors import AdapterError, NoraWarning
from .fold import Folded, RankError, fold
from .readers import FORMATS, AdapterDeltas, check_against_base, detect_format, read_adapter
from .convert import ConvertReport, convert_adapter, verify_folded

__all__ = [
    "AdapterError",
    "NoraWarning",
    "RankError",
    "Folded",
    "fold",
    "FORMATS",
    "AdapterDeltas",
    "detect_format",
    "read_adapter",
    "check_against_base",
    "ConvertReport",
    "convert_adapter",
    "verify_folded",
]
