"""offload.addresses: the client address every per-address limit counts, behind a balancer or not."""

from __future__ import annotations

import pytest
from django.test import RequestFactory, override_settings

from app.forms import client_ip
from offload.addresses import client_address, parse_networks, rightmost_untrusted

BALANCERS = parse_networks(["10.0.0.0/8", "127.0.0.1", "::1"])


@pytest.mark.parametrize(
    ("remote", "forwarded", "client"),
    [
        # the balancer appended the client's address: that is the client
        ("127.0.0.1", "203.0.113.7", "203.0.113.7"),
        # the client sent its own X-Forwarded-For: the balancer appended the real one after it
        ("127.0.0.1", "1.2.3.4, 203.0.113.7", "203.0.113.7"),
        # two trusted hops (a CDN edge in 10/8, then our balancer): skip both
        ("127.0.0.1", "6.6.6.6, 203.0.113.7, 10.1.2.3", "203.0.113.7"),
        # a client that claims to be one of our proxies is still the right-most untrusted entry
        ("127.0.0.1", "10.9.9.9, 203.0.113.7", "203.0.113.7"),
        # garbage written by the client, left of the real entry: ignored
        ("127.0.0.1", "unknown, <script>, 203.0.113.7", "203.0.113.7"),
        # garbage as the last entry: it is untrusted, so it is the client's key (never a proxy)
        ("127.0.0.1", "203.0.113.7, not-an-ip", "not-an-ip"),
        # IPv6 clients, and an IPv4-mapped balancer address
        ("::1", "2001:db8::5", "2001:db8::5"),
        ("::ffff:127.0.0.1", "203.0.113.7", "203.0.113.7"),
        # a trusted peer without the header (its own health check): the peer itself
        ("127.0.0.1", "", "127.0.0.1"),
        # every hop trusted: the left-most one we know of
        ("127.0.0.1", "10.0.0.5, 10.0.0.6", "10.0.0.5"),
    ],
)
def test_behind_a_trusted_balancer_the_client_is_the_rightmost_untrusted_entry(remote, forwarded, client):
    assert rightmost_untrusted(remote, forwarded, BALANCERS) == client


@pytest.mark.parametrize("forwarded", ["1.2.3.4", "1.2.3.4, 5.6.7.8", "127.0.0.1", ""])
def test_a_peer_that_is_not_trusted_is_the_client_whatever_its_header_claims(forwarded):
    assert rightmost_untrusted("198.51.100.9", forwarded, BALANCERS) == "198.51.100.9"


def test_with_no_trusted_proxies_the_header_is_never_read():
    assert rightmost_untrusted("127.0.0.1", "203.0.113.7", ()) == "127.0.0.1"


def test_a_typo_in_the_setting_is_an_error_not_a_silent_trust_of_nobody():
    with pytest.raises(ValueError):
        parse_networks(["10.0.0.0/33"])
    with pytest.raises(ValueError):
        parse_networks(["balancer.local"])


def test_client_address_reads_the_setting_as_a_list_or_a_comma_separated_string():
    environ = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "1.1.1.1, 203.0.113.7"}
    with override_settings(OFFLOAD_TRUSTED_PROXIES=()):
        assert client_address(environ) == "10.0.0.2"  # the default: REMOTE_ADDR, as before
    with override_settings(OFFLOAD_TRUSTED_PROXIES=["10.0.0.0/8"]):
        assert client_address(environ) == "203.0.113.7"
    with override_settings(OFFLOAD_TRUSTED_PROXIES="192.0.2.1, 10.0.0.0/24"):
        assert client_address(environ) == "203.0.113.7"
    with override_settings(OFFLOAD_TRUSTED_PROXIES="192.0.2.1"):
        assert client_address(environ) == "10.0.0.2"  # changed settings are read again


def test_login_throttling_counts_the_same_address():
    request = RequestFactory().post("/accounts/login/", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="203.0.113.7")
    with override_settings(OFFLOAD_TRUSTED_PROXIES=["10.0.0.0/8"]):
        assert client_ip(request) == "203.0.113.7"
    with override_settings(OFFLOAD_TRUSTED_PROXIES=[]):
        assert client_ip(request) == "10.0.0.2"
