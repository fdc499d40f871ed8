"""The API: the default throttles, a scoped view, a view with its own throttle, the comparison."""

from typing import Any, ClassVar

from rest_framework.response import Response
from rest_framework.views import APIView
from throttles import DrfTen, OursTen, SearchThrottle

from tokenlimit.integrations.drf import ScopedTokenBucketThrottle


class Hello(APIView):  # type: ignore[misc]
    """DEFAULT_THROTTLE_CLASSES: anonymous 5/min per IP, each user 10/min."""

    def get(self, request: Any) -> Response:
        user = getattr(request.user, "pk", None)
        return Response({"hello": "anonymous" if user is None else f"user {user}"})


class Upload(APIView):  # type: ignore[misc]
    """The scope "uploads" (DEFAULT_THROTTLE_RATES): 2/min per user, shared by its views."""

    throttle_classes: ClassVar[list[Any]] = [ScopedTokenBucketThrottle]
    throttle_scope = "uploads"

    def get(self, request: Any) -> Response:
        return Response({"uploaded": True})


class Search(APIView):  # type: ignore[misc]
    throttle_classes: ClassVar[list[Any]] = [SearchThrottle]

    def get(self, request: Any) -> Response:
        return Response({"results": []})


class CompareDrf(APIView):  # type: ignore[misc]
    throttle_classes: ClassVar[list[Any]] = [DrfTen]

    def get(self, request: Any) -> Response:
        return Response({"ok": True})


class CompareOurs(APIView):  # type: ignore[misc]
    throttle_classes: ClassVar[list[Any]] = [OursTen]

    def get(self, request: Any) -> Response:
        return Response({"ok": True})
