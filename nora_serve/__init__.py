"""nora-serve: fold, train and serve NoRA, three-matrix (SLoRA/NLoRA/IntTune) and
dynamic-rank DoRA adapters next to each other on one base model with vLLM."""

__version__ = "0.1.0"
