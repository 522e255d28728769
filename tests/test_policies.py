"""Namespace policies (the demo settings' namespaces and the rule forms)."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from offload.exceptions import ChannelError, PermissionDenied
from offload.policies import ANONYMOUS, Identity, check_publish, check_subscribe, compile_rule

alice = Identity(1, "alice")
carol = Identity(3, "carol", frozenset({"staff"}))


def test_public_namespace_is_open_to_anonymous_but_server_publish_only():
    check_subscribe(ANONYMOUS, "public:news")
    with pytest.raises(PermissionDenied) as info:
        check_publish(alice, "public:news")
    assert info.value.code == "publish_forbidden"


def test_user_channel_is_for_that_user_only():
    check_subscribe(alice, "user:1")
    for who in (ANONYMOUS, carol):
        with pytest.raises(PermissionDenied) as info:
            check_subscribe(who, "user:1")
        assert info.value.code == "forbidden"


def test_rooms_need_a_login():
    check_subscribe(alice, "room:general")
    with pytest.raises(PermissionDenied):
        check_subscribe(ANONYMOUS, "room:general")


def test_group_namespace_checks_membership_for_subscribe_and_publish():
    check_subscribe(carol, "staff:ops")
    check_publish(carol, "staff:ops")
    with pytest.raises(PermissionDenied):
        check_subscribe(alice, "staff:ops")
    with pytest.raises(PermissionDenied):
        check_publish(alice, "staff:ops")


def test_unknown_namespace_and_bad_names_are_channel_errors():
    with pytest.raises(ChannelError) as info:
        check_subscribe(alice, "secret:x")
    assert info.value.code == "unknown_namespace"
    with pytest.raises(ChannelError) as info:
        check_subscribe(alice, "bad name")
    assert info.value.code == "invalid_channel"


def is_even_user(identity, channel):
    return identity.user_id is not None and identity.user_id % 2 == 0


def test_custom_callables_and_dotted_paths_run_through_run_blocking():
    calls = []

    def run_blocking(fn, *args):
        calls.append(fn)
        return fn(*args)

    for spec in (is_even_user, "tests.test_policies.is_even_user"):
        rule = compile_rule(spec)
        assert rule.blocking
        assert rule.check(Identity(2), "x:y") and not rule.check(Identity(1), "x:y")
    assert not compile_rule("public").blocking


@pytest.mark.parametrize("spec", ["everyone", "group:", "no.such.module.rule", 42])
def test_bad_rules_are_configuration_errors(spec):
    with pytest.raises(ImproperlyConfigured):
        compile_rule(spec)
