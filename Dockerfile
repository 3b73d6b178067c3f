# lrpilot controller image.
#
#   docker build -t lrpilot:latest .
#   docker run --rm -p 5555:5555 -p 9477:9477 lrpilot:latest
#
# Two stages: the builder installs the distribution into a venv; the runtime
# stage copies only that venv, so nothing used to build (pip's build
# isolation, setuptools, wheel caches) is left in the final image. Both stages
# share the same base, so the venv's interpreter symlink stays valid.

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY controller/ controller/
COPY client/ client/
COPY policies/ policies/

RUN python -m venv /opt/lrpilot \
    && /opt/lrpilot/bin/pip install --no-cache-dir ".[postgres,fast]"


FROM python:3.11-slim

LABEL org.opencontainers.image.title="lrpilot" \
      org.opencontainers.image.description="Learning-rate controller daemon for long-running training jobs"

ENV PATH=/opt/lrpilot/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed, unprivileged uid so Kubernetes' runAsNonRoot can verify it and a
# volume's owner is predictable (fsGroup 10001 in deploy/k8s).
RUN groupadd --system --gid 10001 lrpilot \
    && useradd --system --uid 10001 --gid lrpilot --no-create-home \
       --home-dir /var/lib/lrpilot --shell /usr/sbin/nologin lrpilot \
    && mkdir -p /etc/lrpilot /var/lib/lrpilot \
    && chown lrpilot:lrpilot /var/lib/lrpilot

COPY --from=build /opt/lrpilot /opt/lrpilot
# Baked in so the image starts with nothing mounted; mount a directory over
# /etc/lrpilot (not a single file) to replace it and keep hot reload working.
COPY policies/default.yaml /etc/lrpilot/policy.yaml

WORKDIR /var/lib/lrpilot
USER 10001:10001
VOLUME /var/lib/lrpilot

# 5555 clients (ZeroMQ), 9477 Prometheus metrics. The admin socket is a Unix
# socket in the state dir, mode 0600: only the controller's user (the one
# `docker exec <ctr> lrpilot status` runs as) can steer jobs.
EXPOSE 5555 9477
ENV LRPILOT_ADMIN=ipc:///var/lib/lrpilot/admin.sock

# Asks the controller's own loop (not just a port): exits 0 only when the
# admin socket answers within 2 s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["lrpilot", "status"]

ENTRYPOINT ["lrpilot", "serve"]
CMD ["--policy", "/etc/lrpilot/policy.yaml", "--state-dir", "/var/lib/lrpilot", "--bind", "tcp://0.0.0.0:5555", "--admin-bind", "ipc:///var/lib/lrpilot/admin.sock", "--metrics-host", "0.0.0.0", "--metrics-port", "9477"]
