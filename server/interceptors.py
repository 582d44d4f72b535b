"""Moved to ``aqimodels.process.interceptors``: this path stays only until the branches written against it are merged."""

from aqimodels.process.interceptors import (
    MAX_MESSAGE_CHARS,
    ServerInterceptor,
    Wire,
    check_string_caps,
    current_caller,
    current_request_id,
)

__all__ = ["MAX_MESSAGE_CHARS", "ServerInterceptor", "Wire", "check_string_caps", "current_caller", "current_request_id"]
