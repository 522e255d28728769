"""Load clients (bench/.venv-bench, uvloop): ``python -m bench.loadclient ROLE CONFIG_JSON``.

Each role is its own process, so load never delays a measuring client's timestamps; the roles and the modules:
``bench/README.md``.
"""
