#!/usr/bin/env bash
# Makes a Debian 12 base image on the local daemon without any image registry: debootstrap
# builds a minimal root filesystem from the Debian mirror apt already uses, and `docker
# import` turns it into an image. Does nothing when the image exists. Prints the image's
# reference on stdout (progress goes to stderr). Needs root and the debootstrap package.
set -euo pipefail
reference=${1:-sidecar-executor/debian:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$reference" >/dev/null 2>&1; then
  echo "$reference"
  exit 0
fi
rootfs=$(mktemp -d /var/tmp/debian-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap of Debian bookworm (minbase) from $mirror: a few minutes" >&2
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >&2
# The image's apt sees the same suites as a stock Debian image: updates and security too.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
SOURCES
# Like Debian's slim images: no documentation, manual pages or translations, now or later.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EXCLUDES'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EXCLUDES
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
tar --numeric-owner -C "$rootfs" -c . \
  | docker import --change 'CMD ["/bin/bash"]' - "$reference" >&2
echo "$reference"
