"""The app's own authentication: ``Authorization: Token <name>`` for a few known names."""

from typing import Any

from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed

TOKENS = {"alice": 1, "bob": 2}  # token -> user id


class User:
    is_authenticated = True

    def __init__(self, pk: int) -> None:
        self.pk = pk


class TokenAuthentication(BaseAuthentication):  # type: ignore[misc]
    def authenticate(self, request: Any) -> tuple[User, str] | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Token":
            return None
        if token not in TOKENS:
            raise AuthenticationFailed("unknown token")
        return User(TOKENS[token]), token

    def authenticate_header(self, request: Any) -> str:
        return "Token"  # a bad token answers 401, with WWW-Authenticate
