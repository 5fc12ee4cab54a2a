# ndovu-proxy as a sidecar. Build: docker build -t ndovu-proxy .
# The app shares the pod's network namespace and sends its requests to 127.0.0.1:8080;
# kubelet probes reach the admin listener on :9901 (it shows no secrets).

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# uvloop (a dependency on Linux) ships as a wheel: no compiler needed
RUN python -m venv /opt/ndovu \
 && /opt/ndovu/bin/pip install . \
 && /opt/ndovu/bin/pip uninstall -y pip

FROM python:3.12-slim
COPY --from=build /opt/ndovu /opt/ndovu
# pip compiled the bytecode at build time: nothing is written at run time (read-only root works).
# The proxy listens on its default, 127.0.0.1:8080 (the pod's app shares the loopback); no
# NDOVU_PROXY_LISTEN here, so that a config with routes: (each its own listen) runs as it is.
ENV PATH=/opt/ndovu/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NDOVU_PROXY_ADMIN_LISTEN=0.0.0.0:9901 \
    NDOVU_PROXY_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 \
    CMD ["python", "-m", "proxy.probe"]
# exec form: the proxy is PID 1 and gets SIGTERM itself, drains and exits 0
ENTRYPOINT ["ndovu-proxy"]
CMD ["serve"]
