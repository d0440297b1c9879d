# idemload in a container: the release binary alone, run as a non-root user.
#
#   docker build -t idemload .
#   docker run --rm -v "$PWD:/work" idemload run examples/usage.toml
#
# The build stage compiles with the lockfile; the runtime stage carries the
# stripped binary, CA certificates (HTTPS sources, TLS databases) and nothing
# else.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin idemload

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /work --shell /usr/sbin/nologin idemload \
    && mkdir -p /work && chown idemload /work
COPY --from=build /src/target/release/idemload /usr/local/bin/idemload
USER idemload
WORKDIR /work
ENTRYPOINT ["idemload"]
CMD ["--help"]
