# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain (librdkafka is built from the bundled
# sources by rdkafka-sys), then copy the binary into a small non-root runtime image.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential perl pkg-config python3 libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# sqlx-core with TCP_NODELAY, wired in by [patch.crates-io]
COPY vendor ./vendor
COPY src ./src
COPY migrations ./migrations
COPY config ./config
COPY tests ./tests
COPY benches ./benches
RUN cargo build --release --locked --bin outbox-relay

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY config/outbox-relay.toml /etc/outbox-relay/outbox-relay.toml
USER 10001:10001
ENV OUTBOX_RELAY_CONFIG=/etc/outbox-relay/outbox-relay.toml
# No HEALTHCHECK: the relay runs beside an application, and a health status that followed the
# broker or the database (as `check` does) would mark the application's deployment unhealthy
# during their outages. Liveness is `/healthz` (with `[http] listen`), which fails only when the
# relay loop is wedged; broker and database health are on `/readyz` and in the metrics.
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
