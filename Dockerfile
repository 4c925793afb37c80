# mtrank: one image for the ranking service (default CMD), the trainer and the feature materializer.
#
#   docker build -t mtrank:latest .
#   docker build -t mtrank:dev --build-arg INSTALL_EXTRAS=dev .    # + dev extra (locust) for the load test
#
# torch: pyproject.toml pins torch==2.13.0 and the builder stage installs it first, on its own layer.
# Which wheel that spec resolves to (CPU-only or CUDA) is the builder's concern: configure pip's package
# source for the build (pip.conf / PIP_* environment, e.g. via a build secret) or pass another spec with
# --build-arg TORCH_SPEC=... (a local-version CPU build such as "torch==2.13.0+cpu" still satisfies the pin).

############################ builder: a self-contained venv at /opt/venv ############################
FROM python:3.11-slim AS builder

ARG TORCH_SPEC="torch==2.13.0"
# Comma-separated optional-dependency groups of pyproject.toml to install as well (e.g. "dev").
ARG INSTALL_EXTRAS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# 1. torch alone: the biggest, slowest-changing dependency gets its own cached layer.
RUN pip install --upgrade pip setuptools wheel \
 && pip install "${TORCH_SPEC}"

# 2. the other dependencies (and requested extras), read from pyproject.toml, so that editing the
#    source does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e.strip() for e in os.environ.get('INSTALL_EXTRAS', '').split(',') if e.strip()]; print('\n'.join(p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# 3. the project itself (packages model/ and service/, console script `mtrank`).
COPY README.md ./
COPY model/ model/
COPY service/ service/
RUN pip install --no-deps . \
 && pip check \
 && mtrank --help > /dev/null

############################ runtime ############################
FROM python:3.11-slim AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MTRANK_ARTIFACTS=/artifacts \
    MTRANK_DATA_DIR=/data \
    MTRANK_HOST=0.0.0.0 \
    MTRANK_PORT=8000

# Unprivileged user. /artifacts is created owned by it, so a named volume mounted there starts out
# writable for the trainer; /data is meant for a read-only bind mount of the KuaiRand-Pure files.
RUN groupadd --system --gid 10001 mtrank \
 && useradd --system --uid 10001 --gid mtrank --home-dir /home/mtrank --create-home \
        --shell /usr/sbin/nologin mtrank \
 && mkdir -p /artifacts /data \
 && chown mtrank:mtrank /artifacts

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY configs/ configs/
COPY model/ model/
COPY service/ service/
COPY loadtest/ loadtest/

USER mtrank
EXPOSE 8000

# Ready = model loaded and warmed (GET /readyz answers 200; 503 until then). No curl in slim images.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]

CMD ["mtrank", "serve", "--host", "0.0.0.0", "--port", "8000"]
