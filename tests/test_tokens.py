"""Connection and subscription tokens (offload.tokens), the "token" policy rule and the
token commands, with the time passed in: no wall clock, no database, no server."""

from __future__ import annotations

import base64
import json

import pytest
from django.contrib.auth.models import User
from django.core import signing
from django.core.exceptions import ImproperlyConfigured

from offload import policies
from offload.core.protocol import Refresh, Subscribe, parse_command
from offload.exceptions import PermissionDenied, ProtocolError
from offload.policies import ANONYMOUS, Identity, check_publish, check_subscribe
from offload.tokens import (
    CONNECTION_SALT,
    SUBSCRIPTION_SALT,
    check_subscription,
    check_user,
    connection_token,
    expiry_deadline,
    mint_connection_token,
    mint_subscription_token,
    password_binding,
    query_subscriptions,
    subscription_token,
    token_channel,
    verify_connection_token,
    verify_subscription_token,
)

NOW = 1_750_000_000.25


def alice(password: str = "pbkdf2_sha256$hash-of-alice", active: bool = True) -> User:
    """An unsaved user: the tokens read only its key, password hash and is_active."""
    return User(pk=7, username="alice", password=password, is_active=active)


def minted_for(user: User, now: float = NOW, ttl: float = 60) -> str:
    return mint_connection_token(user.pk, password_binding(user), now=now, ttl=ttl)


def payload_of(token: str) -> dict:
    """What a client (offload.js) reads: the part before the dot, base64url JSON."""
    encoded = token.partition(".")[0]
    return json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))


def refused(code: str, fn, *args, **kwargs) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.reason
    return info.value


# -- minting and verifying ------------------------------------------------------------


def test_a_connection_token_names_its_user_until_it_expires():
    user = alice()
    token = minted_for(user, ttl=60)
    claim = verify_connection_token(token, now=NOW)
    assert (claim.user_id, claim.expires) == (7, 1_750_000_061)  # whole seconds, rounded up
    check_user(claim, user)
    assert verify_connection_token(token, now=claim.expires - 0.001) == claim
    refused("token_expired", verify_connection_token, token, now=claim.expires)
    refused("token_expired", verify_connection_token, token, now=claim.expires + 3600)


def test_the_payload_is_readable_url_safe_json_with_the_expiry_and_nothing_secret():
    user = alice()
    token = minted_for(user)
    assert all(c.isalnum() or c in "-_." for c in token) and token.count(".") == 1
    payload = payload_of(token)
    assert payload == {"u": 7, "exp": 1_750_000_061, "h": password_binding(user)}
    assert user.password not in token and len(payload["h"]) == 16
    sub = mint_subscription_token("private:doc-1", None, now=NOW, ttl=5)
    assert payload_of(sub) == {"c": "private:doc-1", "exp": 1_750_000_006}


@pytest.mark.parametrize("ttl", [0, -1, float("nan")])
def test_a_ttl_must_be_positive(ttl):
    with pytest.raises(ValueError):
        minted_for(alice(), ttl=ttl)
    with pytest.raises(ValueError):
        mint_subscription_token("private:a", now=NOW, ttl=ttl)


def test_the_wrappers_use_the_settings_ttls(settings):
    settings.OFFLOAD_CONNECTION_TOKEN_TTL = 30
    settings.OFFLOAD_SUBSCRIPTION_TOKEN_TTL = 300
    connection = verify_connection_token(connection_token(alice()), now=0)
    subscription = verify_subscription_token(subscription_token("private:x", user=alice()), now=0)
    assert subscription.expires - connection.expires in range(269, 272)  # both minted just now
    assert subscription.user_id == 7 and subscription.channel == "private:x"
    assert verify_subscription_token(subscription_token("private:x", user=42, ttl=1), now=0).user_id == 42


def test_one_kind_of_token_is_never_the_other():
    connection = minted_for(alice())
    subscription = mint_subscription_token("private:a", 7, now=NOW, ttl=60)
    refused("token_invalid", verify_subscription_token, connection, now=NOW)
    refused("token_invalid", verify_connection_token, subscription, now=NOW)
    # Django's own signed values (default salt) are not tokens either.
    refused("token_invalid", verify_connection_token, signing.Signer(sep=".").sign_object({"u": 7}), now=NOW)


def test_a_tampered_token_is_invalid():
    token = minted_for(alice())
    encoded, _, signature = token.partition(".")
    forged = base64.urlsafe_b64encode(json.dumps({**payload_of(token), "u": 1}).encode()).rstrip(b"=").decode()
    refused("token_invalid", verify_connection_token, f"{forged}.{signature}", now=NOW)
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    refused("token_invalid", verify_connection_token, f"{encoded}.{flipped}", now=NOW)
    refused("token_invalid", verify_connection_token, encoded, now=NOW)


@pytest.mark.parametrize(
    "token", [None, 42, "", ".", "a.", ".b", "a.b.c", "ab cd.ef", "é.b", "a" * 1100 + ".b", "a:b", ["a.b"]]
)
def test_anything_that_is_not_a_token_is_invalid(token):
    refused("token_invalid", verify_connection_token, token, now=NOW)
    refused("token_invalid", verify_subscription_token, token, now=NOW)
    assert token_channel(token) is None


@pytest.mark.parametrize(
    "payload",
    [[7], {"exp": 1_750_000_061, "h": "x"}, {"u": True, "exp": 1_750_000_061, "h": "x"}, {"u": 7, "h": "x"},
     {"u": 7, "exp": "soon", "h": "x"}, {"u": 7, "exp": 1.5e9, "h": "x"}, {"u": 7, "exp": 1_750_000_061}],
)  # fmt: skip
def test_a_signed_payload_of_the_wrong_shape_is_invalid(payload):
    token = signing.Signer(salt=CONNECTION_SALT, sep=".").sign_object(payload)
    refused("token_invalid", verify_connection_token, token, now=NOW)


def test_a_signed_subscription_payload_of_the_wrong_shape_is_invalid():
    for payload in ({"exp": 1_750_000_061}, {"c": 5, "exp": 1_750_000_061}, {"c": "a:b", "exp": 2e9, "u": [1]}):
        token = signing.Signer(salt=SUBSCRIPTION_SALT, sep=".").sign_object(payload)
        refused("token_invalid", verify_subscription_token, token, now=NOW)


def test_keys_rotate_through_secret_key_fallbacks(settings):
    from django.conf import settings as django_settings

    user = alice()
    old_key = django_settings.SECRET_KEY
    token = minted_for(user)
    settings.SECRET_KEY = "a-brand-new-secret-key-" * 3
    settings.SECRET_KEY_FALLBACKS = [old_key]
    claim = verify_connection_token(token, now=NOW)
    check_user(claim, user)  # the password binding of the old key still counts
    assert verify_connection_token(minted_for(user), now=NOW).binding != claim.binding
    settings.SECRET_KEY_FALLBACKS = []
    refused("token_invalid", verify_connection_token, token, now=NOW)
    assert verify_connection_token(minted_for(user), now=NOW)


def test_a_password_change_or_a_deactivation_revokes_the_users_tokens():
    user = alice()
    claim = verify_connection_token(minted_for(user), now=NOW)
    user.password = "pbkdf2_sha256$another-hash"
    assert "password" in refused("token_invalid", check_user, claim, user).reason
    assert "deactivated" in refused("token_invalid", check_user, claim, alice(active=False)).reason
    check_user(claim, alice())


# -- subscription tokens ---------------------------------------------------------------


def test_a_subscription_token_opens_its_channel_only_and_only_for_its_user():
    for_alice = mint_subscription_token("private:doc-1", 7, now=NOW, ttl=60)
    anyone = mint_subscription_token("private:doc-1", None, now=NOW, ttl=60)
    assert check_subscription(for_alice, "private:doc-1", 7, now=NOW).user_id == 7
    assert check_subscription(for_alice, "private:doc-1", "7", now=NOW)  # keys compare as text (UUIDs too)
    refused("forbidden", check_subscription, for_alice, "private:doc-2", 7, now=NOW)
    refused("forbidden", check_subscription, for_alice, "private:doc-1", 8, now=NOW)
    refused("forbidden", check_subscription, for_alice, "private:doc-1", None, now=NOW)
    for user_id in (None, 7, 8):
        check_subscription(anyone, "private:doc-1", user_id, now=NOW)
    refused("token_expired", check_subscription, anyone, "private:doc-1", None, now=NOW + 61)


def test_a_subscription_token_needs_a_valid_channel_name():
    with pytest.raises(Exception) as info:
        mint_subscription_token("no namespace", now=NOW, ttl=60)
    assert info.value.code == "invalid_channel"


def test_url_subscriptions_take_their_channel_from_the_token():
    a = mint_subscription_token("private:a", now=NOW, ttl=60)
    b = mint_subscription_token("private:b", now=NOW, ttl=60)
    assert token_channel(a) == "private:a"
    subscriptions, unreadable = query_subscriptions(["public:x", "private:b"], [a, b, "garbage", "x.y"])
    assert subscriptions == {"public:x": None, "private:b": b, "private:a": a}
    assert list(subscriptions) == ["public:x", "private:b", "private:a"]
    assert unreadable == ["garbage", "x.y"]


# -- the "token" rule ------------------------------------------------------------------


@pytest.fixture
def token_namespace(settings):
    settings.OFFLOAD_NAMESPACES = {"private": {"subscribe": "token"}, "room": {"subscribe": "authenticated"}}
    policies.reset_cache()
    yield
    policies.reset_cache()


def test_a_token_namespace_needs_a_valid_token_for_that_channel(token_namespace):
    alice_identity = Identity(7, "alice", expires=NOW + 60)
    token = mint_subscription_token("private:doc-1", 7, now=NOW, ttl=60)
    assert check_subscribe(alice_identity, "private:doc-1", token=token, now=NOW).namespace.name == "private"
    assert "needs a subscription token" in refused("forbidden", check_subscribe, alice_identity, "private:doc-1").reason
    refused("forbidden", check_subscribe, ANONYMOUS, "private:doc-1", token=token, now=NOW)
    refused("forbidden", check_subscribe, alice_identity, "private:doc-2", token=token, now=NOW)
    refused("token_expired", check_subscribe, alice_identity, "private:doc-1", token=token, now=NOW + 61)
    refused("token_invalid", check_subscribe, alice_identity, "private:doc-1", token=token + "x", now=NOW)
    refused("publish_forbidden", check_publish, alice_identity, "private:doc-1")


def test_other_namespaces_ignore_tokens(token_namespace):
    token = mint_subscription_token("room:a", now=NOW, ttl=60)
    refused("forbidden", check_subscribe, ANONYMOUS, "room:a", token=token, now=NOW)
    check_subscribe(Identity(7), "room:a", token="not even a token")


def test_a_token_rule_cannot_gate_publishing(settings):
    for spec in ({"subscribe": "token", "publish": True}, {"subscribe": "public", "publish": "token"}):
        settings.OFFLOAD_NAMESPACES = {"private": spec}
        policies.reset_cache()
        with pytest.raises(ImproperlyConfigured, match="gates subscribing only"):
            policies.namespace_of("private:a")
    policies.reset_cache()


def test_an_identitys_expiry_does_not_change_who_it_is():
    assert Identity(7, "alice", expires=NOW) == Identity(7, "alice")


# -- the commands and the clocks -------------------------------------------------------


def test_subscribe_carries_a_token_and_refresh_needs_one():
    assert parse_command('{"type":"subscribe","channel":"private:a","token":"t.s","ref":1}') == Subscribe(
        "private:a", None, 1, "t.s"
    )
    assert parse_command('{"type":"subscribe","channel":"private:a"}').token is None
    assert parse_command('{"type":"refresh","token":"t.s","ref":"r9"}') == Refresh("t.s", "r9")
    for text in (
        '{"type":"refresh"}',
        '{"type":"refresh","token":""}',
        '{"type":"refresh","token":5}',
        '{"type":"subscribe","channel":"private:a","token":["t"]}',
        '{"type":"subscribe","channel":"private:a","token":"' + "t" * 1025 + '"}',
    ):
        with pytest.raises(ProtocolError) as info:
            parse_command(text)
        assert info.value.code == "bad_message"


def test_the_expiry_moves_to_the_monotonic_clock():
    assert expiry_deadline(None, NOW, 50.0) is None
    assert expiry_deadline(NOW + 30, NOW, 50.0) == 80.0
    assert expiry_deadline(NOW - 5, NOW, 50.0) == 45.0  # already past: due at once
