"""Django Channels 4 comparison anchor: a minimal project in its own venv, started by ``bench/anchor.py``."""
