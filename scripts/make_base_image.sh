#!/usr/bin/env bash
# A local Debian base image for building the metasae container where no image registry can be reached.
#
#   bash scripts/make_base_image.sh [TAG]        # default TAG: metasae-base:bookworm-local
#
# debootstrap makes a minimal Debian bookworm root filesystem from the Debian mirror (python3, python3-venv,
# tini, ca-certificates, wordnet-base: what the Dockerfile would otherwise apt-get) and `docker import` turns it
# into an image. Build the real image on top of it with
#
#   DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE_IMAGE=metasae-base:bookworm-local -t metasae .
#
# THIS MACHINE'S CA BUNDLE GOES INTO THIS LOCAL TEST BASE ONLY. Where the package index is reached through a
# TLS-inspecting proxy, pip in a build fails with "self-signed certificate in certificate chain" unless it
# trusts the machine's own bundle, so it is copied to /usr/local/share/metasae-local-ca/ca-bundle.crt and
# PIP_CERT / REQUESTS_CA_BUNDLE / SSL_CERT_FILE point at it. The Dockerfile never copies a CA bundle: an image
# built FROM the default base (debian:bookworm-slim) trusts Debian's CAs only.
#
# Needs root, debootstrap and a running Docker engine. Reuses an existing image of that tag unless
# METASAE_BASE_REBUILD=1. Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), HOST_CA_BUNDLE
# (default /etc/ssl/certs/ca-certificates.crt; empty: none).
set -euo pipefail

tag="${1:-metasae-base:bookworm-local}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ca="${HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"

log() { printf 'make_base_image: %s\n' "$*" >&2; }

if [ "${METASAE_BASE_REBUILD:-0}" != 1 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  log "$tag exists (METASAE_BASE_REBUILD=1 makes it again)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "debootstrap needs root"
  exit 1
fi
command -v debootstrap >/dev/null || {
  log "debootstrap is not installed (apt-get install debootstrap)"
  exit 1
}

rootfs="$(mktemp -d /tmp/metasae-rootfs.XXXXXX)"
trap 'rm -rf --one-file-system "$rootfs"' EXIT
t0=$(date +%s)
log "debootstrap bookworm from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini,wordnet-base \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -20 "$rootfs.log" >&2
  rm -f "$rootfs.log"
  exit 1
}
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

changes=(--change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8')
if [ -n "$ca" ] && [ -f "$ca" ]; then
  install -D -m 0644 "$ca" "$rootfs/usr/local/share/metasae-local-ca/ca-bundle.crt"
  bundle=/usr/local/share/metasae-local-ca/ca-bundle.crt
  changes+=(--change "ENV PIP_CERT=$bundle" --change "ENV REQUESTS_CA_BUNDLE=$bundle"
    --change "ENV SSL_CERT_FILE=$bundle" --change "LABEL org.metasae.local-ca=$bundle")
  log "the machine's CA bundle ($ca) is trusted in this local base image only"
fi
tar -C "$rootfs" -c . | docker import "${changes[@]}" - "$tag" >/dev/null
log "$tag made in $(($(date +%s) - t0)) s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
