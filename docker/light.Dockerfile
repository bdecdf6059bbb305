# syntax=docker/dockerfile:1
# The light image: tokenizer and router (and the KV store once it lands). No torch, no
# vLLM: these stages never import them, and the image stays a few hundred MB.
#
#   docker build -f docker/light.Dockerfile -t stagemesh-light .
#
# The base is pinned to the Python release the project is tested on; pin its digest too
# (`docker buildx imagetools inspect python:3.11.7-slim-bookworm`) where builds must be
# bit-for-bit repeatable.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, from the project's metadata alone (the package itself is empty
# here), so this layer stays cached while the sources change.
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
RUN python -m venv /opt/stagemesh \
 && /opt/stagemesh/bin/pip install --constraint requirements/constraints.txt . \
 && ! /opt/stagemesh/bin/python -c "import torch" 2>/dev/null
COPY services/ services/
COPY tokenizer_svc/ tokenizer_svc/
COPY prefill_svc/ prefill_svc/
COPY decode_svc/ decode_svc/
COPY kvstore_svc/ kvstore_svc/
COPY router_svc/ router_svc/
RUN /opt/stagemesh/bin/pip install --no-deps . \
 && /opt/stagemesh/bin/python -c "import services.cli, router_svc, tokenizer_svc"

FROM ${PYTHON_IMAGE}
# A fixed uid so a host directory or volume can be prepared for it ahead of time.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/stagemesh --create-home stagemesh \
 && install -d -o stagemesh -g stagemesh /var/lib/stagemesh/models /var/lib/stagemesh/tls \
      /var/lib/stagemesh/etcd
COPY --from=build /opt/stagemesh /opt/stagemesh
ENV PATH=/opt/stagemesh/bin:$PATH \
    STAGEMESH_HOME=/var/lib/stagemesh \
    PYTHONUNBUFFERED=1
USER stagemesh
WORKDIR /var/lib/stagemesh
EXPOSE 50051
# Compose (or `docker run IMAGE tokenizer`) names the stage.
ENTRYPOINT ["stagemesh"]
CMD ["--help"]
