"""What the benchmarks in bench/ share. A scenario imports from here and from nothing else in bench/.

- ``run``: the load generator's own process: log lines, open-files limit,
  pinning, source addresses, event loop, the commit under test.
- ``proc``: CPU and memory from /proc; waiting for a quiet machine.
- ``servers``: the servers under test as pinned subprocesses (the peers, the
  no-op HTTP handler, ``notifier serve``), ports, readiness, stopping, and
  notifier's HTTP API.
- ``redis_server``: a redis-server of the benchmark's own on a free port.
- ``clients``: the fan-out load generator's WebSocket clients.
- ``rounds``: one fan-out round (serial or burst) against one server.
- ``httpload``: the HTTP publish load (wrk, or a Python fallback).
- ``stats``: percentiles, medians, ratios.
"""
