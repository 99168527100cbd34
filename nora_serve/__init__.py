"""nora-serve: fold, train and serve NoRA, three-matrix (SLoRA/NLoRA/IntTune) and
dynamic-rank DoRA adapters next to each other on one base model with vLLM."""


def _version() -> str:
    """The installed distribution's version; ``"dev"`` when run from a tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nora-serve")
    except PackageNotFoundError:
        return "dev"


__version__ = _version()
