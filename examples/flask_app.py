"""A small Flask app behind tokenlimit: a default limit, one view with its own, an exempt probe.

flask --app examples/flask_app:create_app run     # memory://, or $TOKENLIMIT_URL when set
TOKENLIMIT_URL=redis://localhost:6379/0 python examples/flask_app.py
"""

from __future__ import annotations

import os

from flask import Flask

from tokenlimit import Limit
from tokenlimit.integrations.flask import TokenLimit

# One extension, shared by every app the factory makes (the Flask extension pattern).
limits = TokenLimit(
    limit=[Limit.per_second(10, name="burst"), Limit.per_minute(100, name="minute")],
    exempt=["/health"],
)


def create_app(url: str | None = None) -> Flask:
    """The app, limiting through ``url``, else ``$TOKENLIMIT_URL``, else ``memory://``."""
    app = Flask(__name__)
    app.config["TOKENLIMIT_URL"] = url or os.environ.get("TOKENLIMIT_URL") or "memory://"
    limits.init_app(app)

    @app.get("/")
    def index() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/search")
    @limits.limit(Limit.per_minute(5, name="search"))  # replaces the default, own bucket
    def search() -> dict[str, list[str]]:
        return {"results": []}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    create_app().run()
