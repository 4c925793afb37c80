# mtrank: one image for the ranking service (default CMD), the trainer and the feature materializer.
#
#   docker build -t mtrank:latest .
#   docker build -t mtrank:dev --build-arg INSTALL_EXTRAS=dev .    # + dev extra (locust) for the load test
#
# torch: pyproject.toml pins torch==2.13.0; the builder installs that pin first, on its own layer, from
# PyTorch's CPU wheel index (TORCH_INDEX_URL): the CPU-only build (~200 MB) instead of the multi-GB CUDA
# one a plain PyPI install pulls. Its local version (2.13.0+cpu) satisfies the pin. For a CUDA image pass
# another index, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126.
#
# Base images are pinned by digest (reproducible, no silent base change); to move to a newer
# python:3.11-slim, replace the digest in both FROM lines (`docker buildx imagetools inspect
# python:3.11-slim` prints the current one).

############################ builder: a self-contained venv at /opt/venv ############################
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS builder

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
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
 && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

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
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MTRANK_ARTIFACTS=/artifacts \
    MTRANK_DATA_DIR=/data \
    MTRANK_HOST=0.0.0.0 \
    MTRANK_PORT=8000

# Unprivileged user. /artifacts is created owned by it, so a named volume mounted there starts out
# writable for the trainer; /data is meant for a read-only bind mount of the data files (compose mounts
# ./data/kuairand-pure of the project).
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
