"""Settings of the Channels anchor: no database, no auth, no sessions, no access log.

Environment (set by ``run.py`` and ``server.ChannelsServer``): ``REDIS_URL``
(the run's Redis, as a redis-py URL), ``CHANNEL_LAYER`` (``core`` or
``pubsub``), ``API_KEY`` (bearer key of the publish view; empty: 403, as in
the project) and ``CHANNELS_PREFIX`` (the layer's Redis prefix, new at every
start). The layers keep their library defaults (core: capacity 100, expiry
60 s, group_expiry 1 day): the comparison is with what a Channels user gets
out of the box.
"""

import os

BACKENDS = {"core": "channels_redis.core.RedisChannelLayer", "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer"}
API_KEY = os.environ.get("API_KEY", "")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": BACKENDS[os.environ.get("CHANNEL_LAYER", "core")],
        "CONFIG": {"hosts": [os.environ.get("REDIS_URL")], "prefix": os.environ.get("CHANNELS_PREFIX", "asgi")},
    }
}
SECRET_KEY = "channels-anchor-benchmark-only-not-secret"  # nothing uses cookies or signing
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
INSTALLED_APPS: list[str] = []
DATABASES: dict = {}
# both async-capable: the async publish view runs on the event loop without a thread hop
MIDDLEWARE = ["django.middleware.security.SecurityMiddleware", "django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "channels_anchor.urls"
ASGI_APPLICATION = "channels_anchor.asgi.application"
USE_TZ = True
USE_I18N = False
# warnings to stderr; CHANNELS_REDIS_LOG_LEVEL=INFO shows channels_redis' "over capacity" lines
LOGGING = {
    "version": 1,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {"channels_redis": {"level": os.environ.get("CHANNELS_REDIS_LOG_LEVEL", "WARNING")}},
}
