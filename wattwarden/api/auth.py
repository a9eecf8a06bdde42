"""The API's two kinds of auth: a bearer token for writes, basic auth for reads (web config).

Both raise :class:`~wattwarden.api.contract.ApiError` (401, with the challenge to answer).
"""

from __future__ import annotations

import base64
import hmac
from http import HTTPStatus

from starlette.datastructures import Headers

from wattwarden.api.contract import ApiError
from wattwarden.api.webconfig import WebConfig


def check_bearer(headers: Headers, token: str) -> None:
    """``Authorization: Bearer <token>``, the scheme in any case, compared in constant time."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    ok = hmac.compare_digest(given.strip().encode(), token.encode())
    if scheme.lower() != "bearer" or not ok:
        raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")


def check_basic(headers: Headers, web: WebConfig | None) -> None:
    """Basic auth for reads, where the web config names users (RFC 7617: base64 of user:pass)."""
    if web is None or not web.users:
        return
    refused = ApiError(HTTPStatus.UNAUTHORIZED, "basic auth required", challenge="Basic")
    scheme, _, encoded = headers.get("authorization", "").partition(" ")
    try:
        user, colon, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise refused from None  # not credentials at all: no user to check them against
    if scheme.lower() != "basic" or not colon or not web.check_basic(user, password):
        raise refused
