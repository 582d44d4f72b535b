# One image for the registry and the training worker (the command chooses which runs).
# Build: docker build -t aqimodels .   Run: docker run -p 50051:50051 aqimodels
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# torch first, pinned to the CPU build, so nothing pulls a CUDA wheel.
RUN /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY server server
COPY client client
COPY training training
RUN /opt/venv/bin/pip install '.[server,training]'

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 aqimodels
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_TRACKING_URI=sqlite:////data/mlflow.db \
    AQIMODELS_HOST=0.0.0.0 \
    AQIMODELS_LOG_FORMAT=json
RUN mkdir /data && chown aqimodels /data
USER aqimodels
WORKDIR /data
EXPOSE 50051 50052
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s CMD ["aqimodels", "health"]
CMD ["aqimodels", "serve"]
