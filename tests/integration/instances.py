"""Several uWSGI instances of the demo sharing one redis-server, as machines behind a load balancer.

They share the secret key and a copy of one database, so one session cookie
(and one connection token) works on every instance. test_presence and
test_load_balancer set up their instances with :func:`running_instances`.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from offload.testing import LiveServer, RedisServer
from tests.integration.demo import DemoServer


@dataclass(frozen=True)
class User:
    """A demo user with a ready Django session (valid on every instance) and a connection token."""

    name: str
    pk: int
    session: str
    token: str

    @property
    def member(self) -> str:
        """Its member id in presence: the user id."""
        return str(self.pk)

    @property
    def cookie(self) -> str:
        return f"sessionid={self.session}"


# Run by manage.py shell on the first instance: users user000..., and a session and a token for every user.
_MAKE_USERS = """
import json
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
import offload
password = make_password(None)  # nobody logs in with it: the sessions are made here
User.objects.bulk_create([User(username=f"user{n:03}", password=password) for n in range(COUNT)])
users = {}
for user in User.objects.all():
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    users[user.username] = [user.pk, session.session_key, offload.connection_token(user, ttl=3600)]
print(json.dumps(users))
"""


def make_users(server: LiveServer, count: int) -> dict[str, User]:
    command = [sys.executable, "manage.py", "shell", "-c", _MAKE_USERS.replace("COUNT", str(count))]
    out = subprocess.run(command, cwd=server.project_dir, env=server.env, capture_output=True, check=True).stdout
    made = json.loads(out.splitlines()[-1])  # the shell may say what it imported first
    return {name: User(name, pk, session, token) for name, (pk, session, token) in made.items()}


def copy_database(source: LiveServer, target: LiveServer) -> None:
    """The same users and sessions on ``target`` (SQLite's online backup: the WAL included)."""
    src = sqlite3.connect(source.var_dir / "db.sqlite3")
    dst = sqlite3.connect(target.var_dir / "db.sqlite3")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def demo_instances(
    tmp_path_factory,
    redis: RedisServer,
    envs: Mapping[str, Mapping[str, str]],
    *,
    users: int = 0,
    env: Mapping[str, str] | None = None,
) -> tuple[dict[str, DemoServer], dict[str, User]]:
    """Prepared (not started) demo instances on one Redis, with one secret key and one database.

    Args:
        envs: instance name -> its own environment (e.g. ``{"WORKERS": "2"}``).
        users: users (with sessions and tokens) made on the first instance, copied to the others.
        env: environment common to every instance.

    Returns:
        The instances by name, and the users by name.
    """
    common = {"DJANGO_SECRET_KEY": secrets.token_urlsafe(50), **(env or {})}
    servers = {
        name: DemoServer(tmp_path_factory.mktemp(f"instance-{name}"), env={**common, **own}, redis_url=redis.url)
        for name, own in envs.items()
    }
    first, *others = servers.values()
    first.prepare()
    made = make_users(first, users) if users else {}
    for other in others:
        other.prepare()
        copy_database(first, other)
    return servers, made


@contextmanager
def running_instances(
    tmp_path_factory,
    envs: Mapping[str, Mapping[str, str]],
    *,
    start: Iterable[str],
    users: int = 0,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[RedisServer, dict[str, DemoServer], dict[str, User]]]:
    """A redis-server and :func:`demo_instances` on it, the instances named in ``start`` started.

    Every instance (started here or later by the test) and the Redis are stopped on exit.
    """
    redis = RedisServer(tmp_path_factory.mktemp("instances-redis")).start()
    servers: dict[str, DemoServer] = {}
    try:
        servers, made = demo_instances(tmp_path_factory, redis, envs, users=users, env=env)
        for name in start:
            servers[name].start()
        yield redis, servers, made
    finally:
        for server in servers.values():
            server.stop()
        redis.stop()
