#!/usr/bin/env bash
# Installs the programs the tests drive (Debian packages) when they are missing.
# Fails with one line naming what could not be had, so CI never skips silently.
set -uo pipefail
need=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
command -v systemd-analyze >/dev/null || need+=(systemd)
[[ -x /usr/bin/chromium ]] || need+=(chromium)  # tests/test_browser.py, driven by Playwright
command -v redis-server >/dev/null || need+=(redis-server)  # tests/redis_server.py: one per test, own port
((${#need[@]})) || exit 0
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "prereqs: installing ${need[*]}" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
    >/tmp/notifier-prereqs.log 2>&1 \
    || { echo "prereqs: apt-get could not install ${need[*]} (see /tmp/notifier-prereqs.log)" >&2; exit 1; }
else
  echo "prereqs: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
  exit 1
fi
