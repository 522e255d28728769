"""Settings of the Channels anchor: no database, no auth, no sessions.

Environment:
    REDIS_URL      the Redis of the run, e.g. ``unix:///tmp/x/redis.sock`` or
                   ``redis://127.0.0.1:6379/0`` (passed to channels_redis as a
                   URL: redis-py's ``ConnectionPool.from_url``).
    CHANNEL_LAYER  ``core`` (channels_redis.core.RedisChannelLayer, default) or
                   ``pubsub`` (channels_redis.pubsub.RedisPubSubChannelLayer).
    API_KEY        bearer key of ``POST /api/publish/<channel>``; unset or
                   empty disables the API (403), as in the project.
    CHANNELS_PREFIX  the layer's Redis key/channel prefix (default ``asgi``, the
                   library's). ``server.ChannelsServer`` gives every start its
                   own, so group members left in Redis by an earlier run (a
                   server stopped with sockets open never ran group_discard;
                   the core layer keeps them for group_expiry, 1 day) cannot
                   make this run's group_send write to dead channels.

The layers keep their library defaults (core: capacity 100, expiry 60 s,
group_expiry 1 day; msgpack serializer): the comparison is against what a
Channels user gets out of the box.
"""

import os

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
CHANNEL_LAYER = os.environ.get("CHANNEL_LAYER", "core")
API_KEY = os.environ.get("API_KEY", "")
CHANNELS_PREFIX = os.environ.get("CHANNELS_PREFIX") or "asgi"

_BACKENDS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}
if CHANNEL_LAYER not in _BACKENDS:
    raise RuntimeError(f"CHANNEL_LAYER must be one of {sorted(_BACKENDS)}, not {CHANNEL_LAYER!r}")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": _BACKENDS[CHANNEL_LAYER],
        "CONFIG": {"hosts": [REDIS_URL], "prefix": CHANNELS_PREFIX},
    }
}

# Nothing here uses cookies or signing; Django only insists on a value.
SECRET_KEY = "channels-anchor-benchmark-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

# No contrib apps: no migrations, no database. ``channels`` itself only needs
# to be an app for its runserver integration, which is not used.
INSTALLED_APPS: list[str] = []
DATABASES: dict = {}

# Both are async-capable, so the async publish view runs on the event loop
# without a thread hop (a sync-only middleware would force one).
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "channels_anchor.urls"
ASGI_APPLICATION = "channels_anchor.asgi.application"
USE_TZ = True
USE_I18N = False

# Warnings and errors go to stderr (the servers write no access log).
# channels_redis reports "N of M channels over capacity in group G" at INFO:
# CHANNELS_REDIS_LOG_LEVEL=INFO shows it.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {
        "channels_redis": {"level": os.environ.get("CHANNELS_REDIS_LOG_LEVEL", "WARNING")},
    },
}
