"""What a ClientApp mod is typed with and the error codes a site answers with: Flower names outside its app API."""

from __future__ import annotations

from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

__all__ = ["ClientAppCallable", "ErrorCode"]
