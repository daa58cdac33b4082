#!/usr/bin/env bash
# Install what the browser test of the web page (tests/serve/test_serve_page.py) needs: Debian's
# chromium and chromium-driver. Idempotent: does nothing when /usr/bin/chromium and /usr/bin/chromedriver
# exist. The Python side (selenium) is a dev dependency in pyproject.toml, installed by scripts/_env.sh.
#
#     bash scripts/browser_deps.sh
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "browser_deps: installing chromium needs root (or sudo)" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
install() {
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
}

echo "[browser_deps] installing chromium and chromium-driver"
if ! install 2>/dev/null; then
  # the package lists may be missing or stale: refresh them once and retry
  $SUDO apt-get update -qq >/dev/null
  install
fi

for f in /usr/bin/chromium /usr/bin/chromedriver; do
  if [ ! -x "$f" ]; then
    echo "browser_deps: $f is still missing after installing chromium and chromium-driver" >&2
    exit 1
  fi
done
echo "[browser_deps] $(/usr/bin/chromium --version 2>/dev/null | head -n1); $(/usr/bin/chromedriver --version | head -n1)"
