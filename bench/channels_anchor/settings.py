"""Settings of the Channels anchor (no database, auth or sessions; the environment from ``run.py`` and
``bench/anchor.py``). The layers keep their defaults (core: capacity 100, expiry 60 s): what a user gets."""

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
ROOT_URLCONF = "channels_anchor.app"
ASGI_APPLICATION = "channels_anchor.app.application"
USE_TZ = True
USE_I18N = False
# no LOGGING: warnings and errors reach stderr (Python's last-resort handler)
