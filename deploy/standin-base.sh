#!/usr/bin/env bash
# Makes a stand-in for python:3.11-slim on a machine that has a Docker engine but no Docker Hub:
# a minimal Debian bookworm (debootstrap) with Debian's Python 3.11 and venv, and this machine's CA
# bundle (pip inside a build reaches the package index only through it), imported as one image.
#
#   sudo deploy/standin-base.sh [TAG]        # default TAG: aqimodels-base:bookworm-py311
#   BASE_IMAGE=aqimodels-base:bookworm-py311 deploy/smoke.sh
#
# Needs root, debootstrap and a Debian mirror (MIRROR, default deb.debian.org). Idempotent: an
# existing TAG is kept unless REBUILD=1.
set -euo pipefail

TAG="${1:-aqimodels-base:bookworm-py311}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
DOCKER="${DOCKER:-docker}"

if [[ "${REBUILD:-0}" != 1 ]] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "standin-base: $TAG exists (REBUILD=1 to make it again)"
    exit 0
fi
[[ $(id -u) == 0 ]] || { echo "standin-base: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "standin-base: apt-get install debootstrap" >&2; exit 1; }
[[ -r "$CA_BUNDLE" ]] || { echo "standin-base: no CA bundle at $CA_BUNDLE" >&2; exit 1; }

root="$(mktemp -d /tmp/aqimodels-standin.XXXXXX)"
chmod 0755 "$root"  # the image's / (mktemp makes it 0700: only root could run anything)
trap 'rm -rf "$root"' EXIT

start=$SECONDS
# ca-certificates gives the image its own /etc/ssl layout; the machine's bundle then replaces the
# bundle file, so a proxy CA this machine trusts is trusted inside builds too.
nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR"
install -m 0644 "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
# What python:3.11-slim offers and the Dockerfile relies on: `python`, and a small image.
ln -sf python3 "$root/usr/bin/python"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*

tar -C "$root" -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
"$DOCKER" run --rm --network=host "$TAG" python -c 'import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version'
echo "standin-base: $TAG ($("$DOCKER" image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')) in $((SECONDS - start)) s"
