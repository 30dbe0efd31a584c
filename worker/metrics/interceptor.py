"""Counts every gRPC request by method and final status code (sidecar_executor_grpc_requests).

A method name is whatever the client sent. Calls refused before the server looks the method up
(bearer tokens) are counted too, so a method the server does not have is counted as `unknown`:
otherwise every name a client makes up would be a new label, kept for good."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
from prometheus_client import Counter

Context = grpc.aio.ServicerContext[Any, Any]

UNKNOWN_METHOD = "unknown"

# A handler's behaviour attribute, the factory that rebuilds it, and whether it answers with
# a stream (wrapped as an async generator) or with one response.
_HANDLER_KINDS: tuple[tuple[str, Callable[..., Any], bool], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
)


def _code_name(context: Context, default: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for known in grpc.StatusCode:
            if known.value[0] == code:
                return known.name
    return default.name


class RequestCounter(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each handler; the code is the one the handler set or aborted with, OK when it
    ended normally, CANCELLED when the client went away, UNKNOWN for an escaped error.
    `known_methods` (full names, `/package.Service/Method`) are counted by name, any other as
    `unknown`; None counts every method a handler was found for by name."""

    def __init__(self, requests: Counter, known_methods: Collection[str] | None = None) -> None:
        self._requests = requests
        self.known_methods = known_methods

    def _count(self, method: str, context: Context, default: grpc.StatusCode) -> None:
        self._requests.labels(method, _code_name(context, default)).inc()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if self.known_methods is not None and method not in self.known_methods:
            method = UNKNOWN_METHOD
        for kind, make_handler, streams_out in _HANDLER_KINDS:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                wrap = self._streaming if streams_out else self._unary
                return make_handler(  # type: ignore[no-any-return]
                    wrap(method, behaviour),
                    handler.request_deserializer,
                    handler.response_serializer,
                )
        return handler

    def _unary(self, method: str, behaviour: Any) -> Any:
        async def counted(request: Any, context: Context) -> Any:
            default = grpc.StatusCode.UNKNOWN
            try:
                response = await behaviour(request, context)
                default = grpc.StatusCode.OK
                return response
            except asyncio.CancelledError:
                default = grpc.StatusCode.CANCELLED
                raise
            finally:
                self._count(method, context, default)

        return counted

    def _streaming(self, method: str, behaviour: Any) -> Any:
        async def counted(request: Any, context: Context) -> AsyncIterator[Any]:
            default = grpc.StatusCode.UNKNOWN
            try:
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write
                    await result
                default = grpc.StatusCode.OK
            except (asyncio.CancelledError, GeneratorExit):
                default = grpc.StatusCode.CANCELLED
                raise
            finally:
                self._count(method, context, default)

        return counted
