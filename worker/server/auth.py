"""Who may call the REAPI port: TLS server credentials (with optional client certificates) and
a bearer-token check in front of every service but health. docs/AUTH.md says why each rule."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from worker.config import ServerSettings, TlsSettings, is_loopback

log = logging.getLogger(__name__)

# Kubernetes' built-in gRPC probes cannot send metadata, so health checks carry no token. They
# reveal only SERVING / NOT_SERVING per service name.
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"

# Shorter lines of a token file are ignored (with a warning): a guessable token protects nothing.
MIN_TOKEN_LENGTH = 16


class CredentialsError(OSError):
    """A TLS or token file named in the settings cannot be used; the message names the setting."""


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is replaced or rewritten (a Kubernetes Secret update swaps a
    symlink, so the inode changes); None if it cannot be read."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def parse_tokens(text: str, source: str) -> list[bytes]:
    """The tokens of a token file: one per line; blank lines and `#` comments are skipped, and so
    (with a warning giving the line number, never the line) is any line that is not a single
    word of printable ASCII at least MIN_TOKEN_LENGTH long."""
    tokens = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not (line.isascii() and line.isprintable()) or " " in line or "\t" in line:
            log.warning(
                "%s line %d: not a token (one word of printable ASCII); ignored", source, number
            )
        elif len(line) < MIN_TOKEN_LENGTH:
            log.warning(
                "%s line %d: tokens need at least %d characters; ignored",
                source,
                number,
                MIN_TOKEN_LENGTH,
            )
        else:
            tokens.append(line.encode())
    return tokens


class TokenFile:
    """The valid bearer tokens, re-read whenever the file changes (checked on every call: one
    stat). Only SHA-256 digests are kept; a presented token is hashed and compared with every
    digest in constant time, so neither its content nor its length shows in the timing."""

    SETTING = "server.auth.token_file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = _stamp(path)
        try:
            self._digests = self._read()
        except OSError as error:
            raise CredentialsError(
                f"{self.SETTING}: cannot read {path}: {error.strerror}"
            ) from None
        if not self._digests:
            raise CredentialsError(
                f"{self.SETTING}: {path} holds no valid token (one per line, at least "
                f"{MIN_TOKEN_LENGTH} printable characters, no spaces)"
            )

    def _read(self) -> list[bytes]:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        tokens = parse_tokens(text, f"{self.SETTING} {self.path}")
        return [hashlib.sha256(token).digest() for token in tokens]

    def _refresh(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._digests = self._read()
        except OSError as error:
            # Failing closed: a token revoked by replacing the file must not keep working
            # because the new file cannot be read.
            self._digests = []
            log.warning(
                "%s %s cannot be read (%s): refusing every token",
                self.SETTING,
                self.path,
                error.strerror,
            )
            return
        if self._digests:
            log.info("%s %s re-read: %d tokens", self.SETTING, self.path, len(self._digests))
        else:
            log.warning("%s %s holds no valid token: refusing every token", self.SETTING, self.path)

    def accepts(self, token: str) -> bool:
        self._refresh()
        presented = hashlib.sha256(token.encode("utf-8", errors="replace")).digest()
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(presented, known)
        return matched


def bearer_token(metadata: Any) -> str | None:
    """The token of the one `authorization: Bearer TOKEN` entry; None if there is none, several,
    or another scheme."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class _RefusalLog:
    """One warning per interval however many calls are refused, so a flood of bad calls cannot
    flood the log."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._last = float("-inf")
        self._since = 0

    def note(self, method: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._since += 1
            return
        more = f" ({self._since} more refused since the last message)" if self._since else ""
        log.warning("refused %r: %s%s", method, reason, more)
        self._last, self._since = now, 0


if TYPE_CHECKING:  # RpcMethodHandler is generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    # What the stubs say; at run time it is None for a method no servicer has.
    Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]


def _refusing(handler: Handler | None, message: str) -> Handler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED without
    reading or parsing the request (no deserializer: the bytes stay bytes)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


NO_TOKEN = (
    "this server needs a bearer token: send the metadata `authorization: Bearer TOKEN` "
    "(Bazel: --remote_header=Authorization=Bearer TOKEN)"
)
BAD_TOKEN = "the bearer token is not valid"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses every call without a valid bearer token with UNAUTHENTICATED, before the
    servicer sees it: all REAPI services, ByteStream, Operations, reflection, and methods that
    do not exist (so nothing about the server is learnt unauthenticated). Health is open."""

    def __init__(self, tokens: TokenFile) -> None:
        self._tokens = tokens
        self._refusals = _RefusalLog()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIX):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self._tokens.accepts(token):
            return await continuation(handler_call_details)
        reason = NO_TOKEN if token is None else BAD_TOKEN
        self._refusals.note(method, "no bearer token" if token is None else "invalid bearer token")
        handler: Handler | None = await continuation(handler_call_details)
        return _refusing(handler, reason)


class CertificateFiles:
    """The PEM files of server.tls, checked at start-up (a certificate that does not match its
    key, or a CA file without a certificate, stops the service with the setting named) and
    re-read when they change, for the next TLS handshake: a renewed certificate (cert-manager,
    a rotated Secret) is served without a restart."""

    def __init__(self, tls: TlsSettings) -> None:
        assert tls.cert_file is not None and tls.key_file is not None
        self._cert_file, self._key_file = tls.cert_file, tls.key_file
        self._ca_file = tls.client_ca_file
        self._stamps = self._current_stamps()
        self.initial = self._load()

    def _paths(self) -> list[Path]:
        return [p for p in (self._cert_file, self._key_file, self._ca_file) if p is not None]

    def _current_stamps(self) -> list[tuple[int, int, int, int] | None]:
        return [_stamp(path) for path in self._paths()]

    def _load(self) -> grpc.ServerCertificateConfiguration:
        def read(setting: str, path: Path) -> bytes:
            try:
                return path.read_bytes()
            except OSError as error:
                raise CredentialsError(f"{setting}: cannot read {path}: {error.strerror}") from None

        cert = read("server.tls.cert_file", self._cert_file)
        key = read("server.tls.key_file", self._key_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self._cert_file, self._key_file)
        except (ssl.SSLError, ValueError) as error:
            raise CredentialsError(
                f"server.tls.cert_file {self._cert_file} and server.tls.key_file "
                f"{self._key_file} are not a PEM certificate chain and its private key: {error}"
            ) from None
        client_ca = None
        if self._ca_file is not None:
            client_ca = read("server.tls.client_ca_file", self._ca_file)
            try:
                context.load_verify_locations(cafile=self._ca_file)
            except (ssl.SSLError, ValueError) as error:
                raise CredentialsError(
                    f"server.tls.client_ca_file {self._ca_file} holds no PEM CA certificate: "
                    f"{error}"
                ) from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before every TLS handshake: the new files once they changed and are
        valid; None (keep serving the last good ones) otherwise."""
        stamps = self._current_stamps()
        if stamps == self._stamps:
            return None
        self._stamps = stamps  # a bad change is reported once, not at every handshake
        try:
            configuration = self._load()
        except CredentialsError as error:
            log.warning(
                "TLS files changed but cannot be used, keeping the previous ones: %s", error
            )
            return None
        log.info("TLS files re-read")
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,  # type: ignore[arg-type]  # None means "no change" (grpc's docstring)
            require_client_authentication=self._ca_file is not None,
        )


def log_protection(server: ServerSettings) -> None:
    """Says at start-up how clients are checked, and warns when tokens would cross a network in
    clear text."""
    parts = []
    if server.tls.enabled:
        parts.append("TLS" + (" with client certificates" if server.tls.client_ca_file else ""))
    else:
        parts.append("no TLS")
    if server.auth.token_file is not None:
        parts.append(f"bearer tokens from {server.auth.token_file}")
    elif server.tls.client_ca_file is None:
        parts.append("no client authentication")
    log.info("clients: %s; health checks open", ", ".join(parts))
    if not is_loopback(server.listen) and server.auth.token_file and not server.tls.enabled:
        log.warning(
            "bearer tokens are accepted without TLS on %s: anyone on the network path can read "
            "them; set server.tls.cert_file and key_file",
            server.listen,
        )
