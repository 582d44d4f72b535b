# One image for the registry, the training worker and (in deploy/compose.yaml) the MLflow
# tracking server: the command chooses which runs.
#   docker build -t aqimodels:0.1.0 .
#   docker run -p 50051:50051 -v $PWD/tokens.toml:/run/secrets/tokens.toml:ro \
#     -e AQIMODELS_TOKENS_FILE=/run/secrets/tokens.toml aqimodels:0.1.0     # registry (+ a local worker)
#   docker run ... -e AQIMODELS_TARGET=127.0.0.1:50052 aqimodels:0.1.0 aqimodels worker
# It listens on all interfaces, so it refuses to start without a token file (AQIMODELS_TOKENS_FILE).
# The HEALTHCHECK asks the gRPC health service of AQIMODELS_TARGET (default 127.0.0.1:50051, the
# registry); a worker container sets AQIMODELS_TARGET=127.0.0.1:50052 (or overrides the check).

# ---- build stage: the only place pip resolves and downloads ----
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# torch first, pinned to the CPU build from PyTorch's CPU index, so nothing pulls a CUDA wheel;
# the later install sees torch==2.13.0 satisfied and keeps it.
RUN /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY server server
COPY client client
COPY training training
RUN /opt/venv/bin/pip install '.[server,training]' \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import torch; assert not torch.cuda.is_available() and '+cpu' in torch.__version__"

# ---- final stage: the runtime only (no compilers, no build tools, no sources) ----
FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 aqimodels \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/aqimodels aqimodels \
    && mkdir -p /data \
    && chown aqimodels:aqimodels /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_TRACKING_URI=sqlite:////data/mlflow.db \
    AQIMODELS_HOST=0.0.0.0 \
    AQIMODELS_WORKER_HOST=0.0.0.0 \
    AQIMODELS_LOG_FORMAT=json
USER 10001:10001
WORKDIR /data
# 50051 registry gRPC, 50052 worker gRPC, 9464/9465 Prometheus (AQIMODELS_METRICS_PORT / AQIMODELS_WORKER_METRICS_PORT)
EXPOSE 50051 50052 9464 9465
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 CMD ["aqimodels", "--timeout", "5", "health"]
CMD ["aqimodels", "serve"]
