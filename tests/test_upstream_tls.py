"""TLS to Glance: https upstreams are verified (system store or [upstream] ca_file), a client
certificate is presented when configured, verification is skipped only by [upstream] insecure,
and bad TLS files stop start-up naming the key. Against a real TLS stand-in whose CA the tests
generate."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from inloop import TOKEN, ImgcacheFactory
from pki import Pki, make_pki
from processes import IMGCACHE

from imgcache.config import Settings, load_settings
from imgcache.errors import ConfigError
from imgcache.standin import GlanceStandin
from imgcache.upstream import tls_context

MiB = 1 << 20


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh CA, server certificate for 127.0.0.1 and client certificate."""
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    """Where the TLS stand-in keeps its images (made here, off the loop)."""
    path = tmp_path / "tls-glance"
    path.mkdir()
    return path


async def _standin(data_dir: Path, pki: Pki, require_client_cert: bool) -> GlanceStandin:
    standin = GlanceStandin(data_dir, tokens=(TOKEN,),
                            ssl_context=pki.server_context(require_client_cert))
    await standin.start()
    return standin


@pytest.fixture
async def tls_glance(tls_dir: Path, pki: Pki) -> AsyncIterator[GlanceStandin]:
    """A Glance stand-in serving https with a certificate from the test CA."""
    standin = await _standin(tls_dir, pki, require_client_cert=False)
    yield standin
    await standin.stop()


@pytest.fixture
async def mtls_glance(tls_dir: Path, pki: Pki) -> AsyncIterator[GlanceStandin]:
    """An https stand-in that requires a client certificate signed by the client CA."""
    standin = await _standin(tls_dir, pki, require_client_cert=True)
    yield standin
    await standin.stop()


async def test_https_glance_verified_with_ca_file_is_downloaded_and_cached(
    tls_glance: GlanceStandin, imgcache_factory: ImgcacheFactory, pki: Pki
) -> None:
    assert tls_glance.url.startswith("https://127.0.0.1:")
    image = await tls_glance.add_image(size=4 * MiB)
    imgcache = await imgcache_factory(upstream=tls_glance.url, ca_file=str(pki.ca_file))
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and headers["X-Cache-Status"] == "MISS"
    assert hashlib.sha512(body).hexdigest() == image.os_hash_value
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and headers["X-Cache-Status"] == "HIT"
    assert hashlib.sha512(body).hexdigest() == image.os_hash_value
    assert tls_glance.data_gets(image.id) == 1
    assert (await imgcache.metrics())['imgcache_upstream_errors_total{kind="tls"}'] == 0


@pytest.mark.parametrize(("host", "with_ca", "reason"), [
    ("127.0.0.1", False, "unable to get local issuer certificate"),  # CA not in system store
    ("localhost", True, "Hostname mismatch"),  # the certificate is for 127.0.0.1 only
])
async def test_unverifiable_https_glance_is_a_502_naming_the_tls_problem(
    tls_glance: GlanceStandin, imgcache_factory: ImgcacheFactory, pki: Pki,
    host: str, with_ca: bool, reason: str
) -> None:
    image = await tls_glance.add_image(size=MiB)
    flags = {"upstream": f"https://{host}:{tls_glance.port}"}
    if with_ca:
        flags["ca_file"] = str(pki.ca_file)
    imgcache = await imgcache_factory(**flags)
    async with imgcache.session.get(imgcache.data_url(image.id),
                                    headers={"X-Auth-Token": TOKEN}) as response:
        assert response.status == 502
        assert response.content_type == "application/json"
        message = (await response.json())["error"]["message"]
    assert "TLS certificate verification of Glance" in message
    assert reason in message
    assert tls_glance.requests == []  # not one request got through to Glance
    assert (await imgcache.metrics())['imgcache_upstream_errors_total{kind="tls"}'] >= 1


async def test_insecure_skips_verification_and_warns_at_start(
    tls_glance: GlanceStandin, imgcache_factory: ImgcacheFactory,
    caplog: pytest.LogCaptureFixture
) -> None:
    image = await tls_glance.add_image(size=MiB)
    with caplog.at_level(logging.WARNING, logger="imgcache.upstream"):
        imgcache = await imgcache_factory(upstream=tls_glance.url, insecure="true")
    warnings = [r for r in caplog.records
                if r.name == "imgcache.upstream" and r.levelno == logging.WARNING]
    assert any("insecure = true" in r.getMessage() and "NOT verified" in r.getMessage()
               for r in warnings)
    status, _, body = await imgcache.get(image.id)
    assert status == 200
    assert hashlib.sha512(body).hexdigest() == image.os_hash_value


async def test_no_insecure_warning_by_default(
    tls_glance: GlanceStandin, imgcache_factory: ImgcacheFactory, pki: Pki,
    caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="imgcache.upstream"):
        await imgcache_factory(upstream=tls_glance.url, ca_file=str(pki.ca_file))
    assert not [r for r in caplog.records if "insecure" in r.getMessage()]


@pytest.mark.parametrize("combined", [False, True], ids=["cert+key", "one-pem"])
async def test_client_certificate_is_presented_when_configured(
    mtls_glance: GlanceStandin, imgcache_factory: ImgcacheFactory, pki: Pki, combined: bool
) -> None:
    image = await mtls_glance.add_image(size=2 * MiB)
    flags = {"upstream": mtls_glance.url, "ca_file": str(pki.ca_file)}
    if combined:
        flags["cert_file"] = str(pki.client_combined)
    else:
        flags.update(cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    imgcache = await imgcache_factory(**flags)
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and headers["X-Cache-Status"] == "MISS"
    assert hashlib.sha512(body).hexdigest() == image.os_hash_value


async def test_without_a_client_certificate_the_server_refuses(
    mtls_glance: GlanceStandin, imgcache_factory: ImgcacheFactory, pki: Pki
) -> None:
    image = await mtls_glance.add_image(size=MiB)
    imgcache = await imgcache_factory(upstream=mtls_glance.url, ca_file=str(pki.ca_file))
    async with imgcache.session.get(imgcache.data_url(image.id),
                                    headers={"X-Auth-Token": TOKEN}) as response:
        assert response.status in (502, 503)
        message = (await response.json())["error"]["message"]
    assert "client certificate ([upstream] cert_file)" in message
    assert mtls_glance.requests == []


# -- misconfiguration --------------------------------------------------------------------------

def _settings(**flags: str) -> Settings:
    return load_settings(flags, environ={})


@pytest.mark.parametrize(("flags", "named", "problem"), [
    ({"ca_file": "{tmp}/missing.pem"}, "[upstream] ca_file", "No such file"),
    ({"ca_file": "{tmp}"}, "[upstream] ca_file", "Is a directory"),
    ({"ca_file": "{pki}/server_key.pem"}, "[upstream] ca_file", "no usable PEM CA"),
    ({"cert_file": "{tmp}/missing.pem"}, "[upstream] cert_file", "No such file"),
    ({"cert_file": "{pki}/client_cert.pem", "key_file": "{tmp}/missing.pem"},
     "[upstream] key_file", "No such file"),
    ({"cert_file": "{pki}/client_cert.pem"}, "[upstream] cert_file", "client certificate"),
    ({"cert_file": "{pki}/client_cert.pem", "key_file": "{pki}/server_key.pem"},
     "[upstream] cert_file/key_file", "KEY_VALUES_MISMATCH"),
    ({"cert_file": "{pki}/client_cert.pem", "key_file": "{pki}/client_key_encrypted.pem"},
     "[upstream] cert_file/key_file", "unencrypted key"),
])
def test_bad_tls_files_are_a_config_error_naming_the_key(
    pki: Pki, tmp_path: Path, flags: dict[str, str], named: str, problem: str
) -> None:
    values = {k: v.format(tmp=tmp_path, pki=pki.ca_file.parent) for k, v in flags.items()}
    with pytest.raises(ConfigError) as caught:
        tls_context(_settings(**values))  # never prompts for the encrypted key's passphrase
    assert str(caught.value).startswith(named + " ")
    assert problem in str(caught.value)


def test_key_without_cert_is_refused_by_load_settings(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"\[upstream\] key_file .* without \[upstream\] "
                                          r"cert_file"):
        _settings(key_file=str(pki.client_key))


def test_valid_tls_settings_build_a_verifying_context(pki: Pki) -> None:
    import ssl

    settings = _settings(ca_file=str(pki.ca_file), cert_file=str(pki.client_cert),
                         key_file=str(pki.client_key))
    context = tls_context(settings)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    insecure = tls_context(replace(settings, insecure=True))
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname


async def test_a_bad_tls_file_stops_the_app_before_it_serves(
    imgcache_factory: ImgcacheFactory, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"^\[upstream\] ca_file .*missing\.pem"):
        await imgcache_factory(ca_file=str(tmp_path / "missing.pem"))


@pytest.mark.parametrize(("args", "message"), [
    (["--ca-file", "/nonexistent/ca.pem"], "[upstream] ca_file /nonexistent/ca.pem"),
    (["--key-file", "/etc/hostname"], "[upstream] key_file"),
    (["--insecure", "maybe"], "[upstream] insecure"),
    (["--proxy", "https://127.0.0.1:3128"], "[upstream] proxy"),
])
def test_cli_exits_2_naming_the_tls_key(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = subprocess.run(
        [IMGCACHE, "serve", "--cache-dir", str(tmp_path / "cache"), "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", *args],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30,
        check=False)
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr
    assert message in done.stderr
