"""The one error type bad input turns into: a single line naming file, module and tensor."""

from __future__ import annotations

import os


class AdapterError(ValueError):
    """Bad adapter input. ``str(err)`` is one line: ``file: module: tensor: what is wrong``."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None,
                 module: str | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.module = module
        self.tensor = tensor
        self.reason = " ".join(str(message).split())  # one line, always
        super().__init__(self._line())

    def _line(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.module:
            where.append(f"module {self.module}")
        if self.tensor:
            where.append(f"tensor {self.tensor}")
        return ": ".join(where + [self.reason])


class NoraWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLIs print it as one
    ``prog: warning: ...`` line on stderr)."""
