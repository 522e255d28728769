"""Loading the WSGI application imports everything that resolving a socket's user needs.

Session and token lookups run in gevent's native thread pool. A module that
the first lookup imports would be imported by several native threads of a
fresh worker at once, under import locks that gevent's monkey-patching made
green. Each process here is a fresh interpreter: ``sys.modules`` is process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

MAKE_USER = """
import django, json
django.setup()
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.db import SessionStore
from offload.tokens import connection_token
user = get_user_model().objects.create_user("preload", password="x")
session = SessionStore()
session[SESSION_KEY], session[BACKEND_SESSION_KEY] = str(user.pk), "django.contrib.auth.backends.ModelBackend"
session[HASH_SESSION_KEY] = user.get_session_auth_hash()
session.save()
print(json.dumps([session.session_key, connection_token(user)]))
"""

# What uWSGI's master does (load the application), then what a worker's pool threads do.
RESOLVE = """
import io, json, sys, time
from offload.wsgi import get_wsgi_application
get_wsgi_application()
from django.core.handlers.wsgi import WSGIRequest
from offload.policies import token_identity
from offload.tokens import verify_connection_token
from offload.views import _identity_of
session_key, token = json.loads(sys.argv[1])
environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/ws/", "SERVER_NAME": "x", "SERVER_PORT": "80",
           "HTTP_COOKIE": f"sessionid={session_key}", "wsgi.input": io.BytesIO()}
loaded = set(sys.modules)
by_session = _identity_of(WSGIRequest(environ))
by_token = token_identity(verify_connection_token(token, now=time.time()))
print(json.dumps([by_session.username, by_token.username, sorted(set(sys.modules) - loaded)]))
"""


def run(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "OFFLOAD_VAR_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, *args], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_resolving_a_session_user_or_a_token_user_imports_nothing_after_the_application_loaded(tmp_path):
    run(tmp_path, "manage.py", "migrate", "--verbosity", "0")
    keys = run(tmp_path, "-c", MAKE_USER)  # another process: this one's imports must not count
    by_session, by_token, imported = json.loads(run(tmp_path, "-c", RESOLVE, keys))
    assert (by_session, by_token) == ("preload", "preload"), "both lookups found the user"
    assert imported == [], f"imported on first use, in the pool's threads: {imported}"
