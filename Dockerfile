# mediaserver: RTMP ingest to HLS, upgraded in place by relups.
# Not built here (no Docker engine on the development machines); see README.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 mediaserver
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mediaserver ./mediaserver
COPY relups ./relups
RUN pip install --no-cache-dir . && mkdir -p /data && chown mediaserver /data

USER mediaserver
ENV PYTHONUNBUFFERED=1
EXPOSE 1935 8080
VOLUME ["/data"]
# The admin API (relups) listens on 127.0.0.1:8081 inside the container only;
# use `docker exec ... mediaserver relup apply` to reach it.
CMD ["sh", "-c", "printf 'data_dir = \"/data\"\\n[relup]\\ndirectory = \"/app/relups\"\\n' > /tmp/mediaserver.toml && exec mediaserver serve --config /tmp/mediaserver.toml"]
