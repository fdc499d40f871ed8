# The demo API (examples/fastapi_demo) under uvicorn with two workers, limited through Redis/Valkey.
#
#   docker build -t tokenlimit-demo .
#   docker run --rm -p 8000:8000 -e TOKENLIMIT_URL=redis://host.docker.internal:6379/0 tokenlimit-demo
#
# or `docker compose up --build` (docker-compose.yml: Valkey + this image). Without TOKENLIMIT_URL
# the limiter falls back to memory://, which each worker keeps to itself: set it. (The demo still
# accepts REDIS_URL, the name it read before.)
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The library first (this layer is rebuilt only when the package changes): the FastAPI and
# Prometheus extras, hiredis, uvicorn to serve, httpx for tools/load_test.py.
COPY pyproject.toml README.md ./
COPY tokenlimit ./tokenlimit
RUN pip install ".[fastapi,prometheus,hiredis]" "uvicorn>=0.23" "httpx>=0.25"

COPY examples ./examples
COPY tools ./tools

RUN useradd --create-home --uid 10001 app
USER app

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

# TOKENLIMIT_URL comes from the environment (docker run -e / compose).
CMD ["uvicorn", "examples.fastapi_demo.app:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
