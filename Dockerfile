FROM python:3.11-slim
RUN pip install --no-cache-dir uv
WORKDIR /app
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy PATH="/app/.venv/bin:$PATH"
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY alembic.ini ./
COPY migrations ./migrations
COPY service ./service
RUN uv sync --frozen --no-dev
RUN useradd --system --uid 10001 sunotrack
USER sunotrack
EXPOSE 8000
CMD ["sunotrack", "serve", "--host", "0.0.0.0", "--port", "8000"]
