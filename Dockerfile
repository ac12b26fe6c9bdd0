# reservd image: builds the wheel with the Cython counter table (C extension) in a build stage,
# installs it into a slim runtime. NOT BUILT in this project's environment (no registry other
# than PyPI and Debian was reachable there); written to the same steps `./dev` runs.
#   docker build -t reservd .
#   docker run -p 50051:50051 -v reservd-data:/var/lib/reservd \
#     -v /etc/reservd:/etc/reservd:ro reservd serve --config /etc/reservd/reservd.toml
# Binding 0.0.0.0 in a container needs TLS or tokens in the config (or --insecure): reservd
# refuses a non-loopback plain-text bind with no authentication.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY ext ./ext
COPY src ./src
# setup.py generates the gRPC stubs and cythonizes ext/ (build requirements from pyproject).
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && python -c "import zipfile, glob; \
names = zipfile.ZipFile(glob.glob('/wheels/reservd-*.whl')[0]).namelist(); \
assert any(n.startswith('reservd/_ctable') and n.endswith('.so') for n in names), names"

FROM python:3.11-slim-bookworm
RUN groupadd --system reservd && useradd --system --gid reservd --home /var/lib/reservd reservd \
    && install -d -o reservd -g reservd -m 0700 /var/lib/reservd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && RESERVD_REQUIRE_EXT=1 python -c "from reservd.table import EXTENSION; assert EXTENSION"
COPY reservd.example.toml /usr/share/doc/reservd/reservd.example.toml
USER reservd
WORKDIR /var/lib/reservd
ENV RESERVD_DATA_DIR=/var/lib/reservd RESERVD_BIND=0.0.0.0:50051
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
# The health check speaks plain text on loopback; with TLS on the port, check over TLS instead
# (e.g. grpc_health_probe -tls -tls-ca-cert ...).
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc, sys; \
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
c = grpc.insecure_channel('127.0.0.1:50051'); \
sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=2).status == 1 else 1)" \
    || exit 1
ENTRYPOINT ["reservd"]
CMD ["serve"]
