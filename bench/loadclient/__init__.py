"""Load clients (bench venv, uvloop), one process per role so load never delays a measuring client's timestamps."""
