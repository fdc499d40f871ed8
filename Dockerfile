# The demo API (examples/fastapi_demo) under uvicorn with two workers, limited through Redis/Valkey.
#
#   docker build -t tokenlimit-demo .
#   docker run --rm -p 127.0.0.1:8000:8000 -e TOKENLIMIT_URL=redis://host.docker.internal:6379/0 tokenlimit-demo
#
# or `docker compose up --build -d` (docker-compose.yml: Valkey + this image). Without
# TOKENLIMIT_URL (or REDIS_URL, the name it read before) the container refuses to start, with
# one line: memory:// would give each worker its own limits.
#
# Reproducible: the base image is pinned by digest and the packages come from the lock
# (requirements/constraints.txt, which `nox -s lock` writes). The digest is python:3.12-slim's
# multi-platform index as public projects pinned it in 2026; it was not re-read from Docker Hub
# when written (no access from where it was). `python tools/pin_base_image.py --check` compares
# it with what Docker Hub serves; without --check it rewrites this line: run it to move on.
FROM python:3.12-slim@sha256:78387bc3881b8273120a12ebe6c1ab22b018ccc2c9adf565ae1ac9b536e184ea

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The library first (this layer is rebuilt only when the package or the lock changes): the
# FastAPI and Prometheus extras, hiredis, uvicorn to serve, httpx for tools/load_test.py, each
# at the lock's version. (hatchling, which builds tokenlimit's own wheel here, is not in the
# lock; the packages installed are.)
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt ./requirements/
COPY tokenlimit ./tokenlimit
RUN pip install -c requirements/constraints.txt ".[fastapi,prometheus,hiredis]" uvicorn httpx

COPY examples ./examples
COPY tools ./tools

RUN useradd --create-home --uid 10001 app
USER app

# TOKENLIMIT_REQUIRE_URL: the app (and its launcher) refuse to start without TOKENLIMIT_URL.
# PROMETHEUS_MULTIPROC_DIR: the workers share their metrics there, so /metrics shows both;
# the launcher empties it at every start (a restarted container must not count twice).
ENV TOKENLIMIT_REQUIRE_URL=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/tokenlimit-metrics

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

# TOKENLIMIT_URL comes from the environment (docker run -e / compose). The launcher checks it,
# sets up the metrics directory, then runs uvicorn with two workers.
CMD ["python", "-m", "examples.fastapi_demo", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
