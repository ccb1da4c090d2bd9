"""The loraplex Python SDK: `Client` / `AsyncClient` stream text from an engine,
`AdminClient` manages the control plane. Results are dataclasses, errors are
`LoraplexError` subclasses carrying the server's sentence.

    from loraplex.client import Client

    with Client("127.0.0.1:50051", api_key="lpx_...") as client:
        answer = client.chat([{"role": "user", "content": "Hi"}], adapter="acme/support")
        print(answer.text, answer.finish_reason, answer.usage.completion_tokens)
"""

from __future__ import annotations

from loraplex.client.admin import AdminClient
from loraplex.client.admin_types import (
    Adapter,
    AdapterState,
    AdapterVersion,
    ApiKey,
    BaseModel,
    Engine,
    EngineState,
    NewApiKey,
    Resolution,
    RetireResult,
    Tenant,
    TenantState,
)
from loraplex.client.aio import AsyncClient
from loraplex.client.errors import (
    AlreadyExistsError,
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LoraplexError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from loraplex.client.inference import Client
from loraplex.client.retry import NO_RETRY, RetryPolicy
from loraplex.client.types import (
    ChatMessage,
    Completion,
    Delta,
    FinishReason,
    Message,
    SamplingOptions,
    Usage,
)

__all__ = [
    "NO_RETRY",
    "Adapter",
    "AdapterState",
    "AdapterVersion",
    "AdminClient",
    "AlreadyExistsError",
    "ApiKey",
    "AsyncClient",
    "BaseModel",
    "CallCancelledError",
    "ChatMessage",
    "Client",
    "Completion",
    "DeadlineExceededError",
    "Delta",
    "Engine",
    "EngineState",
    "FailedPreconditionError",
    "FinishReason",
    "InternalError",
    "InvalidArgumentError",
    "LoraplexError",
    "Message",
    "NewApiKey",
    "NotFoundError",
    "PermissionDeniedError",
    "Resolution",
    "ResourceExhaustedError",
    "RetireResult",
    "RetryPolicy",
    "SamplingOptions",
    "Tenant",
    "TenantState",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
