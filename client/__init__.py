"""The published client of aqimodels: the typed registry client, its errors, and the CLI."""

import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _quiet_ctrl_c(_signum: int, _frame: object) -> None:
    # Ends the process here, not by raising: a handler's exception can land in a callback of the
    # import machinery (a module lock's weakref callback), where Python prints it as "Exception
    # ignored" and goes on loading, and the Ctrl-C is lost. Nothing has been done yet to clean up.
    _os._exit(130)


# Run as the `aqimodels` console script, this is the first of our code to execute, before the
# CLI's modules load (a few hundred ms): Ctrl-C meanwhile exits 130 quietly instead of printing a
# KeyboardInterrupt traceback. cli.main() puts Python's own handler back. Imported as a library,
# nothing changes. (Before this line runs, the interpreter's own start and site, Ctrl-C is
# Python's: out of our reach.)
if (_os.path.basename(_sys.argv[0] if _sys.argv else "") == "aqimodels"
        and _threading.current_thread() is _threading.main_thread()
        and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler):
    _signal.signal(_signal.SIGINT, _quiet_ctrl_c)

# The handler above goes in before these imports, which are the slow part.
from aqimodels.client.client import RegistryClient  # noqa: E402 - after the Ctrl-C handler above
from aqimodels.client.errors import (  # noqa: E402 - the same
    AlreadyExistsError,
    AqiModelsError,
    BackendUnavailableError,
    FailedPreconditionError,
    InvalidArgumentError,
    JobNotFoundError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    StaleVersionError,
    UnauthenticatedError,
    UnimplementedError,
    VersionNotFoundError,
)

__all__ = [
    "AlreadyExistsError",
    "AqiModelsError",
    "BackendUnavailableError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "JobNotFoundError",
    "ModelNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "RegistryClient",
    "StaleVersionError",
    "UnauthenticatedError",
    "UnimplementedError",
    "VersionNotFoundError",
]
