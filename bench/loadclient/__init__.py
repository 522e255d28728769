"""Load clients (bench/.venv-bench, uvloop): ``python -m bench.loadclient ROLE CONFIG_JSON``.

Roles, each its own process so that load never delays a measuring client's
timestamps: ``subscribers`` (websockets that measure every delivery, and the
HTTP publisher and view probe when asked), ``load`` (slow downloads and
report tasks) and ``stalled`` (websockets that stop reading, watched from
the kernel's side). Building blocks: ``http`` (a tiny HTTP/1.1 client with
slow reads), ``ws`` (picows subscriber pool), ``measure`` (windows, series,
delivery ledger, loop lag).
"""
