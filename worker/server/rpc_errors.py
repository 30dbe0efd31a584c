"""Turns the domain's ServiceError into a gRPC status at the edge of every RPC, in one place."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from worker.errors import ServiceError, status_code_of

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    if isinstance(error, ServiceError):
        await context.abort(status_code_of(error), str(error))
    log.exception("unexpected error in RPC", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")


def rpc_errors(method: F) -> F:
    """Decorates a servicer method (coroutine or async generator) so that errors become
    statuses: ServiceError by the table in worker.errors, anything else INTERNAL (logged)."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(context, error)

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error)

    return unary  # type: ignore[return-value]
