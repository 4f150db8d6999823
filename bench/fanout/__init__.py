"""Fan-out benchmark (issue 4): notifier against three Python peers; run it with ``python -m bench.fanout``.

Parts: ``rounds`` (serial and burst), ``memory`` (memory per idle
connection), ``http_publish`` (HTTP publish -> WebSocket receive); with
``bench.send_floor`` they are run in turn, and reported, by ``__main__``.
"""
