"""The one error of the inference path: bad input, named in the message.

Inside aqimodels it is an ``InvalidArgumentError`` (so the registry's one error table maps it to
INVALID_ARGUMENT); in a process without aqimodels it is a plain ``ValueError``.
"""

from __future__ import annotations

try:
    from aqimodels.client.errors import InvalidArgumentError as _Base
except ImportError:  # a portable model loaded without aqimodels

    class _Base(ValueError):  # type: ignore[no-redef]  # the stand-in when aqimodels is not installed
        def __init__(self, message: str, field: str = "") -> None:
            super().__init__(message)
            self.message = message
            self.field = field


class InputError(_Base):
    """The input (a dataset, or a frame given to ``predict``) is unusable; the message says why."""

    def __init__(self, message: str, field: str = "dataset") -> None:
        super().__init__(message, field=field)
