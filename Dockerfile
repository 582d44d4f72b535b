# One image for the registry, the training worker and (in deploy/compose.yaml) the MLflow
# tracking server: the command chooses which runs.
#   docker build -t aqimodels:0.1.0 .
#   docker run -p 50051:50051 -v $PWD/tokens.toml:/run/secrets/tokens.toml:ro \
#     -e AQIMODELS_TOKENS_FILE=/run/secrets/tokens.toml aqimodels:0.1.0     # registry (+ a local worker)
#   docker run ... -e AQIMODELS_TARGET=127.0.0.1:50052 aqimodels:0.1.0 aqimodels worker
# It listens on all interfaces, so it refuses to start without a token file (AQIMODELS_TOKENS_FILE).
# The HEALTHCHECK asks the gRPC health service of AQIMODELS_TARGET (default 127.0.0.1:50051, the
# registry); a worker container sets AQIMODELS_TARGET=127.0.0.1:50052 (or overrides the check).
#
# Build arguments (the defaults are what a machine with Docker Hub and PyPI needs):
#   BASE_IMAGE    a Debian-based image with Python 3.11 and venv, `python` on PATH and useradd
#                 (default python:3.11-slim; deploy/standin-base.sh makes one without Docker Hub)
#   TORCH_SOURCE  where torch==2.13.0 (CPU) comes from: a pip index URL (default PyTorch's CPU
#                 index), or the file name of a wheel put in deploy/wheels/ (offline builds)
#   e.g. docker build --build-arg BASE_IMAGE=aqimodels-base:bookworm-py311 \
#          --build-arg TORCH_SOURCE=torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl -t aqimodels:0.1.0 .
# deploy/smoke.sh builds and runs it end to end.
ARG BASE_IMAGE=python:3.11-slim

# ---- build stage: the only place pip resolves and downloads ----
FROM ${BASE_IMAGE} AS build
ARG TORCH_SOURCE=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# torch first, pinned to the CPU build, so nothing pulls a CUDA wheel; the later install sees
# torch==2.13.0 satisfied and keeps it. The wheel folder stays in this stage only.
COPY deploy/wheels/ /wheels/
RUN case "$TORCH_SOURCE" in \
      http://*|https://*) /opt/venv/bin/pip install --index-url "$TORCH_SOURCE" torch==2.13.0 ;; \
      *) /opt/venv/bin/pip install "/wheels/$TORCH_SOURCE" ;; \
    esac
# The context is only the package's files (.dockerignore): one COPY, one layer.
COPY . /src
RUN /opt/venv/bin/pip install '/src[server,training]' \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import torch; assert not torch.cuda.is_available() and '+cpu' in torch.__version__"
# What only building or testing the libraries needs (~370 MB): the packages' own test suites,
# torch's C++ headers, CMake files and C++ test binaries (torch_shm_manager stays: torch runs it).
# The imports below prove the runtime is whole.
RUN cd /opt/venv/lib/python3.11/site-packages \
    && find . -type d -name tests -prune -exec rm -rf {} + \
    && rm -rf torch/include torch/share torch/test \
    && find torch/bin -mindepth 1 -not -name torch_shm_manager -exec rm -rf {} + \
    && /opt/venv/bin/python -c "import mlflow.pyfunc, torch, torch_geometric, xgboost, sklearn, scipy.stats, pandas, pyarrow, \
aqimodels.server.main, aqimodels.training.main, aqimodels.training.trainers"

# ---- final stage: the runtime only (no compilers, no build tools, no sources) ----
# The virtualenv comes last: each instruction after it would copy it once more on a copying
# storage driver (vfs), and nothing above depends on it.
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 aqimodels \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/aqimodels aqimodels \
    && mkdir -p /data \
    && chown aqimodels:aqimodels /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_TRACKING_URI=sqlite:////data/mlflow.db \
    AQIMODELS_HOST=0.0.0.0 \
    AQIMODELS_WORKER_HOST=0.0.0.0 \
    AQIMODELS_LOG_FORMAT=json
WORKDIR /data
# 50051 registry gRPC, 50052 worker gRPC, 9464/9465 Prometheus (AQIMODELS_METRICS_PORT / AQIMODELS_WORKER_METRICS_PORT)
EXPOSE 50051 50052 9464 9465
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 CMD ["aqimodels", "--timeout", "5", "health"]
CMD ["aqimodels", "serve"]
USER 10001:10001
COPY --from=build /opt/venv /opt/venv
