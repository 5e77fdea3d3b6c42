"""Optional bearer-token auth for the HTTP API.

The key comes from ``ServeConfig.api_key`` or, preferably, the environment variable named by
``ServeConfig.api_key_env``, read where the application is built (``sepit serve``, the
``serve deploy`` builder) and, failing that, in the ingress replica's own environment (on a
cluster the variable may exist only on worker nodes).  Only its SHA-256 digest travels to the
replicas (deployment init arguments are pickled into the Serve controller), and requests are
checked with a constant-time comparison of digests.  Liveness/readiness probes and the API docs stay open;
every ``/v1/*`` route needs ``Authorization: Bearer <key>`` when a key is set.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Optional

from sepit.errors import SepitError
from sepit.serve.config import ServeConfig

#: Paths reachable without a key (probes and the OpenAPI docs).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})


class AuthError(SepitError):
    """The request lacks a valid API key (answered with 401)."""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def resolve_api_key_digest(config: ServeConfig, environ: Optional[dict] = None) -> Optional[str]:
    """SHA-256 of the configured API key, or None when auth is off.

    ``config.api_key`` wins; otherwise the variable ``config.api_key_env`` of ``environ``
    (default ``os.environ``).  An empty value means no key.
    """
    environ = os.environ if environ is None else environ
    key = config.api_key
    if not key and config.api_key_env:
        key = environ.get(config.api_key_env, "")
    key = (key or "").strip()
    return key_digest(key) if key else None


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuth:
    """Checks requests against a key digest; ``digest=None`` lets every request through."""

    def __init__(self, digest: Optional[str]):
        self.digest = digest

    @property
    def enabled(self) -> bool:
        return self.digest is not None

    def requires_key(self, path: str) -> bool:
        return self.enabled and path not in OPEN_PATHS

    def check(self, authorization: Optional[str]) -> None:
        """Raise :class:`AuthError` unless the header carries the configured key."""
        if not self.enabled:
            return
        token = bearer_token(authorization)
        if token is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(key_digest(token), self.digest):
            raise AuthError("invalid API key")


def route_path(scope) -> str:
    """The request path inside the application (the Serve ``route_prefix`` / root path removed)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


class ApiKeyMiddleware:
    """ASGI middleware: answer 401 before the body is read when a ``/v1/*`` request lacks the key."""

    def __init__(self, app, auth: ApiKeyAuth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.auth.requires_key(route_path(scope)):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                header = value.decode("latin-1")
        try:
            self.auth.check(header)
        except AuthError as exc:
            from sepit.serve.errors import error_body
            from sepit.serve.limits import send_json

            await send_json(send, 401, error_body(str(exc), "authentication_error", "Authorization", 401),
                            extra_headers=[(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
