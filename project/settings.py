"""Django settings of the demo project.

Deployment values come from the environment (12-factor); every variable is
listed in docs/settings.md with its default. Nothing secret is committed: the
default SECRET_KEY is generated once into the git-ignored var/ directory.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# Runtime state (database, Redis socket and data, collected static, secret key).
VAR_DIR = Path(os.environ.get("OFFLOAD_VAR_DIR", BASE_DIR / "var")).resolve()
# Files uWSGI sends via X-Sendfile (downloads, generated reports): uwsgi.ini
# honours X-Sendfile only below this directory.
FILES_ROOT = VAR_DIR / "files"
DOWNLOADS_DIR = FILES_ROOT / "downloads"
REPORTS_DIR = FILES_ROOT / "reports"
# var/ holds sessions (db.sqlite3), Redis' data, reports and spool files: owner
# only (0700 directories, 0600 files). The umask is set here because this module
# is imported before anything is written there by every Python process that
# writes there: `manage.py migrate/collectstatic` (make prepare, LiveServer)
# before uWSGI starts, then uWSGI's workers and spooler. Creating directories
# with a mode would miss the files SQLite, the spooler and the tasks create.
# uwsgi.ini sets the same umask for the master and its daemons (Redis).
os.umask(0o077)
for _dir in (VAR_DIR, VAR_DIR / "spool", DOWNLOADS_DIR, REPORTS_DIR):
    _dir.mkdir(mode=0o700, parents=True, exist_ok=True)
if VAR_DIR.stat().st_uid == os.geteuid():
    VAR_DIR.chmod(0o700)  # a var/ made by an earlier version under umask 022 was world-readable
# Django chmods stored files (collectstatic's copies) to FILE_UPLOAD_PERMISSIONS (default 0o644).
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700


def _secret_key() -> str:
    key = os.environ.get("DJANGO_SECRET_KEY")
    if key:
        return key
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(50)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        return key


SECRET_KEY = _secret_key()
DEBUG = _env_bool("DJANGO_DEBUG")
ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "offload",
    "app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": VAR_DIR / "db.sqlite3",
        # WAL lets readers (page views, websocket auth) run beside a writer.
        "OPTIONS": {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL;"},
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Hashed file names (far-future cache headers in uwsgi.ini) plus .gz and .br
    # twins that uWSGI's static-gzip-all serves to clients that accept them.
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Login throttling (app/forms.py): failed logins per account and per client
# address within the window (seconds) before the login view answers 429.
LOGIN_FAILURES_PER_ACCOUNT = int(os.environ.get("LOGIN_FAILURES_PER_ACCOUNT", 5))
LOGIN_FAILURES_PER_IP = int(os.environ.get("LOGIN_FAILURES_PER_IP", 20))
LOGIN_FAILURES_WINDOW = float(os.environ.get("LOGIN_FAILURES_WINDOW", 900))
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s[%(process)d]: %(message)s"}},
    # Clients' mistakes (bad Host, malformed bodies) log one line, not a traceback each.
    "filters": {"client_errors": {"()": "project.errors.ClientErrorsWithoutTraceback"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["client_errors"]}},
    "loggers": {
        "offload": {"handlers": ["console"], "level": os.environ.get("OFFLOAD_LOG_LEVEL", "INFO")},
        "django": {"handlers": ["console"], "level": "WARNING"},
    },
}

# --- offload -------------------------------------------------------------------
# Embedded Redis (started by uwsgi.ini when REDIS_URL is unset) listens here.
OFFLOAD_REDIS_URL = os.environ.get("REDIS_URL") or f"unix://{VAR_DIR}/redis.sock"
OFFLOAD_API_KEY = os.environ.get("OFFLOAD_API_KEY") or None
# OFFLOAD_LOG_FORMAT=json: JSON log lines with each websocket's connection id (docs/operator.md).
OFFLOAD_LOG_FORMAT = os.environ.get("OFFLOAD_LOG_FORMAT", "text")
OFFLOAD_NAMESPACES = {
    # Anyone may listen; only the server publishes (benchmarks, smoke checks).
    "public": {"subscribe": "public", "publish": False, "history_size": 100, "history_ttl": 3600},
    # Chat rooms: logged-in users listen and publish from the socket; the hook
    # checks and saves each message (app/realtime.py) and sets its author.
    "room": {
        "subscribe": "authenticated",
        "publish": "authenticated",
        "publish_hook": "app.realtime.save_chat_message",
        "history_size": 200,
        "history_ttl": 86400,
        # Who is in the room: one member per user (all tabs), join/leave events.
        "presence": True,
    },
    # "<user> is typing…" notices: published by the server (RPC "typing"), kept seconds.
    "typing": {"subscribe": "authenticated", "publish": False, "history_size": 1, "history_ttl": 10},
    # Personal notifications: user:<id> is readable by that user only.
    "user": {"subscribe": "user", "publish": False, "history_size": 50, "history_ttl": 86400},
    # Members of the Django group "staff" may listen and publish from the socket.
    "staff": {"subscribe": "group:staff", "publish": True, "history_size": 100, "history_ttl": 3600},
    # Per-worker live stats for the demo page.
    "stats": {"subscribe": "public", "publish": False, "history_size": 1, "history_ttl": 60},
}
OFFLOAD_FILES_ROOT = FILES_ROOT
# Benchmarks only: stream files from Python and run tasks inline ("offloading disabled").
OFFLOAD_INLINE = _env_bool("OFFLOAD_INLINE")
# Websocket handshakes through MIDDLEWARE too (slower; see docs/settings.md).
OFFLOAD_WEBSOCKET_MIDDLEWARE = _env_bool("OFFLOAD_WEBSOCKET_MIDDLEWARE")
# The publish API through MIDDLEWARE and request signals too (slower; see docs/settings.md).
OFFLOAD_API_MIDDLEWARE = _env_bool("OFFLOAD_API_MIDDLEWARE")
# The demo's slow upstream (app/slow_upstream.py; `make slow-upstream` runs it).
SLOW_UPSTREAM_URL = os.environ.get("SLOW_UPSTREAM_URL", "http://127.0.0.1:8001")
for _name in (
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "STATS_INTERVAL",
    "MAX_MESSAGES_PER_SECOND",
    "MAX_CONTROL_FRAMES_PER_SECOND",
    "ABUSE_COOLDOWN",
    "HANDSHAKE_TIMEOUT",
    "TASK_TIMEOUT",
    "REDIS_TIMEOUT",
    "PRESENCE_HEARTBEAT",
    "PRESENCE_LEASE_TTL",
    "PRESENCE_GRACE",
    "PRESENCE_COALESCE",
):
    if f"OFFLOAD_{_name}" in os.environ:
        globals()[f"OFFLOAD_{_name}"] = float(os.environ[f"OFFLOAD_{_name}"])
for _name in (
    "MAX_MESSAGE_BYTES",
    "MAX_SUBSCRIPTIONS",
    "MAX_QUEUED_BYTES",
    "HISTORY_PAGE_BYTES",
    "MESSAGE_BURST",
    "CONTROL_FRAME_BURST",
    "MAX_CONNECTIONS_PER_IP",
    "GC_THRESHOLD",
):
    if f"OFFLOAD_{_name}" in os.environ:
        globals()[f"OFFLOAD_{_name}"] = int(os.environ[f"OFFLOAD_{_name}"])
if "OFFLOAD_SUBPROTOCOLS" in os.environ:
    OFFLOAD_SUBPROTOCOLS = tuple(_env_list("OFFLOAD_SUBPROTOCOLS", ""))
if "OFFLOAD_ALLOWED_ORIGINS" in os.environ:
    OFFLOAD_ALLOWED_ORIGINS = _env_list("OFFLOAD_ALLOWED_ORIGINS", "")
# Behind a load balancer: its addresses (docs/deployment.md), and the file that drains an instance.
OFFLOAD_TRUSTED_PROXIES = _env_list("OFFLOAD_TRUSTED_PROXIES", "")
OFFLOAD_DRAIN_FILE = os.environ.get("OFFLOAD_DRAIN_FILE") or None
# Prometheus metrics (docs/metrics.md): OFFLOAD_METRICS=0 turns them off (the bench compares);
# OFFLOAD_METRICS_KEY lets a remote scraper in with a bearer key (else loopback only).
OFFLOAD_METRICS = _env_bool("OFFLOAD_METRICS", True)
OFFLOAD_METRICS_KEY = os.environ.get("OFFLOAD_METRICS_KEY") or None
# Seconds a client may take to send its request headers (0: no bound; docs/security.md).
if "OFFLOAD_HEADER_TIMEOUT" in os.environ:
    OFFLOAD_HEADER_TIMEOUT = float(os.environ["OFFLOAD_HEADER_TIMEOUT"])
