"""Pin the Dockerfile's base image to the digest its tag names today, from Docker Hub.

    python tools/pin_base_image.py            # rewrite the FROM line with the current digest
    python tools/pin_base_image.py --check    # exit 1 when the pinned digest is not the tag's

The digest is the tag's multi-platform index (what ``docker pull python:3.12-slim`` prints as
``Digest:``), read with the registry's anonymous pull token: no Docker needed. Run it on
purpose (a base image update is a change to review), then rebuild and commit the Dockerfile.
Needs network access to auth.docker.io and registry-1.docker.io.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
# FROM <name>:<tag>[@sha256:<digest>]: the first stage's base image.
FROM_LINE = re.compile(
    r"^FROM (?P<name>[a-z0-9._/-]+):(?P<tag>[\w.-]+)"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?(?P<rest>.*)$",
    re.MULTILINE,
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def base_image(dockerfile: str) -> tuple[str, str, str | None]:
    """(name, tag, digest or None) of the first FROM line."""
    match = FROM_LINE.search(dockerfile)
    if match is None:
        raise ValueError("the Dockerfile has no 'FROM name:tag' line")
    return match["name"], match["tag"], match["digest"]


def pinned(dockerfile: str, digest: str) -> str:
    """``dockerfile`` with its first FROM line pinned to ``digest`` (tag kept, for readers)."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError(f"not an image digest: {digest!r}")
    return FROM_LINE.sub(
        lambda m: f"FROM {m['name']}:{m['tag']}@{digest}{m['rest']}", dockerfile, count=1
    )


def current_digest(name: str, tag: str, timeout: float = 20.0) -> str:
    """The digest Docker Hub serves for ``name:tag`` now (official images live under library/)."""
    repository = name if "/" in name else f"library/{name}"
    token_url = (
        "https://auth.docker.io/token?service=registry.docker.io"
        f"&scope=repository:{repository}:pull"
    )
    with urllib.request.urlopen(token_url, timeout=timeout) as response:
        token = json.load(response)["token"]
    request = urllib.request.Request(
        f"https://registry-1.docker.io/v2/{repository}/manifests/{tag}",
        method="HEAD",
        headers={"Authorization": f"Bearer {token}", "Accept": ", ".join(INDEX_TYPES)},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        digest = response.headers.get("Docker-Content-Digest")
    if not digest:
        raise RuntimeError(f"the registry sent no digest for {name}:{tag}")
    return str(digest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    args = parser.parse_args(argv)
    text = args.dockerfile.read_text()
    name, tag, old = base_image(text)
    try:
        new = current_digest(name, tag)
    except OSError as error:
        print(f"pin_base_image: cannot read {name}:{tag} from Docker Hub: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{name}:{tag} pinned {old or 'nothing'}; Docker Hub serves {new}")
        return 0 if old == new else 1
    if old != new:
        args.dockerfile.write_text(pinned(text, new))
    print(f"{name}:{tag}@{new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
