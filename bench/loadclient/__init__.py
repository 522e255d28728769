"""Load clients (run in bench/.venv-bench on uvloop): ``python -m bench.loadclient ROLE CONFIG``.

Roles (one module each, so a scenario can combine them in separate processes
and the load generator never delays the measuring client's timestamps):

* ``probe``: websocket subscribers, the broadcast publisher and the Django
  view probe; measures latency in windows the orchestrator opens.
* ``load``: slow downloads and report tasks (the background load).
* ``manychannels``: subscribers spread over many channels, measuring only;
  ``httppub``: HTTP publishes spread over the same channels (closed or open
  loop). See ``bench/spread.py``.
* ``backpressure``: subscribers and a publisher of big messages; ``stalled``:
  websockets that stop reading once subscribed, watched from the kernel's
  side (slow consumers, ``bench/scenarios/backpressure.py``).

Building blocks: ``channel`` (JSON lines with the orchestrator), ``http``
(a tiny HTTP/1.1 client with slow reads), ``ws`` (picows subscribers),
``measure`` (windows, delivery ledger, open-loop tickers).
"""
