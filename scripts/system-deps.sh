#!/usr/bin/env bash
# System packages the tests need: Debian's chromium (the report page is opened in headless
# Chromium). Idempotent and quiet: returns at once when chromium is already installed.
# If it cannot be installed this only warns: the browser tests then skip, or fail under CI.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "k3batch: chromium is missing and cannot be installed here (needs root and apt-get)" >&2
  exit 0
fi
echo "k3batch: installing Debian's chromium for the browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
install() { apt-get -qq -o Dpkg::Use-Pty=0 install -y --no-install-recommends chromium >/dev/null; }
# A fresh machine may have no package lists, or stale ones: update once and retry.
install 2>/dev/null || { apt-get -qq update >/dev/null && install; } ||
  echo "k3batch: could not install chromium; the browser tests will not run" >&2
exit 0
