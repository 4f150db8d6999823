#!/usr/bin/env bash
# Installs the programs the tests drive (Debian packages) when they are missing.
# Fails with one line naming what could not be had; the tests never skip for it under CI.
set -uo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
if ((${#need[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
      || { echo "prereqs: could not install ${need[*]} with apt-get" >&2; exit 1; }
  else
    echo "prereqs: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
