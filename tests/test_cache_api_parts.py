"""The pure parts of Glance's cache API on imgcache: the versions document, Keystone's URL
from Glance's 401, Keystone's token answer, and the options. The whole API runs against a
real Keystone and Glance in tests/interop/test_interop_cache_api.py."""

from __future__ import annotations

import pytest

from imgcache.config import format_size, load_settings, parse_optional_url, parse_roles
from imgcache.errors import ConfigError
from imgcache.glance_cache import with_cache_api_version
from imgcache.keystone import caller_from_token_body, keystone_from_www_authenticate

LINKS = [{"rel": "self", "href": "http://glance:9292/v2/"}]


def version(number: str, status: str = "SUPPORTED") -> dict:
    return {"id": f"v{number}", "status": status, "links": LINKS}


def test_versions_document_gains_v2_14_in_order_and_keeps_the_rest() -> None:
    doc = {"versions": [version("2.15"), version("2.9"), version("2.17", "CURRENT"),
                        version("2.7"), version("2.0")]}
    changed = with_cache_api_version(doc)
    assert [v["id"] for v in changed["versions"]] == [
        "v2.15", "v2.14", "v2.9", "v2.17", "v2.7", "v2.0"]
    assert changed["versions"][1] == version("2.14")
    assert doc["versions"][1]["id"] == "v2.9"  # the original is not changed


@pytest.mark.parametrize("doc", [
    {"versions": [version("2.18", "CURRENT"), version("2.14"), version("2.0")]},  # has it
    {"versions": [version("1.1")]},  # no v2 to copy links from
    {"versions": "v2"}, {"other": 1}, [version("2.0")], None, "text",
])
def test_versions_documents_left_alone(doc: object) -> None:
    assert with_cache_api_version(doc) is doc


@pytest.mark.parametrize(("header", "url"), [
    ('Keystone uri="http://ks:5000"', "http://ks:5000"),
    ("Keystone uri='https://ks.example/identity/'", "https://ks.example/identity"),
    ('Keystone uri="http://ks:5000/v3"', "http://ks:5000"),
    ('Negotiate, Keystone uri="http://ks:5000/"', "http://ks:5000"),
    ("Keystone uri=http://ks:5000", "http://ks:5000"),
    ('Keystone uri="file:///etc/passwd"', None),
    ("Basic realm=glance", None),
    ("", None),
])
def test_keystone_url_from_glances_401(header: str, url: str | None) -> None:
    assert keystone_from_www_authenticate(header) == url


def test_caller_from_keystones_token_answer() -> None:
    caller = caller_from_token_body({"token": {
        "user": {"id": "u1", "name": "admin"}, "project": {"id": "p1", "name": "admin"},
        "roles": [{"id": "r1", "name": "admin"}, {"id": "r2", "name": "reader"}],
        "expires_at": "2030-01-01T00:00:00.000000Z"}})
    assert caller.roles == {"admin", "reader"}
    assert caller.describe() == "user admin (u1) in project admin (p1)"
    assert caller.expires_at == 1893456000.0
    system = caller_from_token_body({"token": {"user": {"id": "u"}, "system": {"all": True},
                                               "roles": [], "expires_at": "garbage"}})
    assert system.roles == frozenset() and system.expires_at == 0.0
    assert "the system scope" in system.describe()
    with pytest.raises(KeyError):
        caller_from_token_body({"error": {"code": 404}})


def test_cache_api_options() -> None:
    assert parse_roles(" admin, image_cache_admin ,") == {"admin", "image_cache_admin"}
    assert parse_roles("") == frozenset()
    assert parse_optional_url("") is None
    assert parse_optional_url("https://ks:5000/") == "https://ks:5000"
    for bad in ("adm in", "admin;drop"):
        with pytest.raises(ValueError):
            parse_roles(bad)
    with pytest.raises(ConfigError, match=r"\[cache_api\] keystone_url"):
        load_settings({"keystone_url": "http://a,http://b"}, environ={})
    with pytest.raises(ConfigError, match=r"\[cache_api\] keystone_url"):
        load_settings({"keystone_url": "ks:5000"}, environ={})
    assert load_settings({"cache_api_roles": ""}, environ={}).cache_api_roles == frozenset()


@pytest.mark.parametrize(("count", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (8 << 20, "8.0 MiB"),
    (10 << 30, "10.0 GiB"), (1536 << 30, "1.5 TiB"), (5000 << 40, "5000.0 TiB"),
])
def test_sizes_for_people(count: int, text: str) -> None:
    assert format_size(count) == text
