# wsi-server image: multi-stage, non-root, configured by WSI_* variables.
#   docker build -t wsi-server .
#   docker run -p 8000:8000 -v /path/to/slides:/slides:ro -e WSI_REDIS_URL=redis://redis:6379/0 \
#     -e WSI_AUTH=oidc -e WSI_OIDC_ISSUER=... -e WSI_OIDC_CLIENT_ID=... wsi-server
# It listens on 0.0.0.0, so it refuses to start without sign-in (WSI_AUTH=oidc) unless
# WSI_ALLOW_ANONYMOUS=1 says the network may see every slide.
# Every `wsi-server serve` flag has a WSI_* variable (see the README's configuration table).

# -- build: install the package and its dependencies into a self-contained venv ----------
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/wsi
COPY pyproject.toml README.md /src/
COPY wsi_server /src/wsi_server
RUN /opt/wsi/bin/pip install /src

# -- viewer: OpenSeadragon from the npm registry, pinned by package-lock.json -------------
FROM node:20-slim AS viewer
WORKDIR /src
COPY package.json package-lock.json /src/
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error

# -- runtime: the venv only, run by an unprivileged user --------------------------------
FROM python:3.12-slim AS runtime
RUN groupadd --system --gid 10001 wsi \
 && useradd --system --uid 10001 --gid wsi --home-dir /home/wsi --create-home wsi
COPY --from=build /opt/wsi /opt/wsi
COPY --from=viewer /src/node_modules/openseadragon/build/openseadragon /opt/wsi/viewer-assets
# A fixed mmap threshold keeps glibc from serving decoded tiles out of a fragmenting heap
# after the first large thumbnail buffer (25-50 MB less RSS in bench_soak; 128 KiB cost
# render throughput, 256 KiB did not).
ENV PATH=/opt/wsi/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MALLOC_MMAP_THRESHOLD_=262144 \
    WSI_PATHS=/slides \
    WSI_HOST=0.0.0.0 \
    WSI_PORT=8000 \
    WSI_WORKERS=2 \
    WSI_CACHE_SIZE=256 \
    WSI_VIEWER_ASSETS=/opt/wsi/viewer-assets \
    WSI_STATE_DIR=/var/lib/wsi-server
RUN mkdir -p /var/lib/wsi-server && chown wsi:wsi /var/lib/wsi-server && chmod 700 /var/lib/wsi-server
USER wsi
WORKDIR /home/wsi
VOLUME ["/slides", "/var/lib/wsi-server"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WSI_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["wsi-server"]
CMD ["serve"]
