#!/usr/bin/env bash
# The web page's test drives a real headless Chromium (Debian's `chromium` package). Install it
# when it is missing and we can (root with apt-get, as in CI); otherwise say how, and the test
# skips outside CI (in CI it fails instead of skipping).
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium for the web page test (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "note: no chromium found; the browser test will skip (install Debian's chromium)" >&2
fi
