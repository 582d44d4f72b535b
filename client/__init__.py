"""The published client of aqimodels: the typed registry client, its errors, and the CLI."""

from aqimodels.client.client import RegistryClient
from aqimodels.client.errors import (
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
