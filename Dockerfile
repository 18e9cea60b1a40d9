# One image for every role: api, worker, sim, migrate, tenant, apikey.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin comfyfleet

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data comfyfleet \
 && mkdir -p /data/objects && chown -R comfyfleet /data
COPY --from=build /src/target/release/comfyfleet /usr/local/bin/comfyfleet
USER comfyfleet
WORKDIR /data
ENV COMFYFLEET_BIND=0.0.0.0:8080 \
    COMFYFLEET_OBJECT_STORE=/data/objects
EXPOSE 8080
ENTRYPOINT ["comfyfleet"]
CMD ["api"]
