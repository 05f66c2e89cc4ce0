"""Settings: one table of options, read from defaults, an INI file, IMGCACHE_* environment
variables and command-line flags (flag > env > file > default), validated at start-up.

Every option has one INI key (``[section] key``), one flag and one environment variable;
a bad or unknown one stops start-up with a message that names it.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imgcache.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_size(text: str) -> int:
    """Parse ``500M``, ``100G``, ``1.5T`` or plain bytes; units are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("expected a size such as 1048576, 500M, 100G or 2T")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(count: float) -> str:
    """``count`` bytes in binary units, as a person reads them: ``512 B``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def parse_duration(text: str) -> float:
    """Parse ``30s``, ``500ms``, ``5m``, ``1h``, ``7d`` or plain seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("expected a duration such as 30, 30s, 500ms, 5m, 1h or 7d")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6) into a host and a port 0-65535."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9293")
    return host.strip("[]"), int(port)


def parse_urls(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of http(s) base URLs, dropping trailing slashes."""
    urls = tuple(u.strip().rstrip("/") for u in text.split(",") if u.strip())
    if not urls:
        raise ValueError("expected at least one URL such as http://127.0.0.1:9292")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return urls


def parse_proxy(text: str) -> str | None:
    """Parse an ``http://HOST:PORT`` forward-proxy URL; empty means no proxy."""
    text = text.strip().rstrip("/")
    if not text:
        return None
    parts = urlsplit(text)
    if (parts.scheme != "http" or not parts.hostname or parts.path or parts.query
            or parts.username is not None):
        raise ValueError("expected an http://HOST:PORT proxy URL (or empty for none)")
    return text


def parse_optional_url(text: str) -> str | None:
    """Parse one http(s) base URL, dropping a trailing slash; empty means not set."""
    if not text.strip():
        return None
    if "," in text:
        raise ValueError("expected one URL, not a list")
    return parse_urls(text)[0]


def parse_roles(text: str) -> frozenset[str]:
    """Parse a comma-separated list of Keystone role names (empty: none)."""
    roles = frozenset(r.strip() for r in text.split(",") if r.strip())
    if any(not re.fullmatch(r"[\w.:-]+", role) for role in roles):
        raise ValueError("expected role names such as admin, or admin,image_cache_admin")
    return roles
def parse_tier_urls(text: str) -> tuple[str, ...]:
    """Parse the tier nodes' base URLs (comma-separated, empty for no tier); each node once."""
    if not text.strip():
        return ()
    urls = parse_urls(text)
    if len(set(urls)) != len(urls):
        raise ValueError("a tier node is listed twice")
    return urls


def parse_optional_path(text: str) -> Path | None:
    """Parse a file path; empty means not set."""
    return Path(text.strip()) if text.strip() else None


def parse_bool(text: str) -> bool:
    """Parse true/false, yes/no, on/off or 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def parse_log_level(text: str) -> str:
    """Accept a logging level name."""
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected one of debug, info, warning, error, critical")
    return level


def parse_log_format(text: str) -> str:
    """Accept ``plain`` or ``json``."""
    value = text.strip().lower()
    if value not in ("plain", "json"):
        raise ValueError("expected plain or json")
    return value


def parse_policy_check(text: str) -> str:
    """Accept ``download`` or ``metadata``."""
    value = text.strip().lower()
    if value not in ("download", "metadata"):
        raise ValueError("expected download (Glance's download_image policy decides) or "
                         "metadata (only its get_image policy)")
    return value


def parse_mode(text: str) -> int:
    """Parse an octal file mode such as ``0600``; only owner and group bits are allowed."""
    try:
        mode = int(text.strip(), 8)
    except ValueError:
        raise ValueError("expected an octal mode such as 0600 or 0660") from None
    if mode & ~0o770:
        raise ValueError("must not grant access to other users (allowed: 0600, 0660, ...)")
    return mode


def _nonnegative(parse: Callable[[str], float]) -> Callable[[str], float]:
    def checked(text: str) -> float:
        value = parse(text)
        if value < 0:
            raise ValueError("must not be negative")
        return value

    return checked


def _positive(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def checked(text: str) -> Any:
        value = parse(text)
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    return checked


def _nonnegative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("expected a whole number, 0 or more")
    return int(text)


@dataclass(frozen=True)
class Option:
    """One setting: where it lives in the INI file, its flag, its parser and default."""

    name: str  # the Settings field
    section: str
    key: str
    flag: str
    parse: Callable[[str], Any]
    default: str
    help: str

    @property
    def env(self) -> str:
        """The environment variable: IMGCACHE_ plus the flag in upper case."""
        return "IMGCACHE_" + self.flag.upper().replace("-", "_")

    @property
    def ini_name(self) -> str:
        """How the option is named in messages: ``[section] key``."""
        return f"[{self.section}] {self.key}"


OPTIONS: tuple[Option, ...] = (
    Option("listen", "server", "listen", "listen", parse_hostport, "127.0.0.1:9293",
           "Address Nova's [glance] endpoint_override points at."),
    Option("metrics_listen", "server", "metrics_listen", "metrics-listen", parse_hostport,
           "127.0.0.1:9294", "Address of the Prometheus /metrics and /healthz listener."),
    Option("upstream", "upstream", "url", "upstream", parse_urls, "http://127.0.0.1:9292",
           "Glance API base URL(s), comma-separated; tried in order when one is unreachable."),
    Option("connect_timeout", "upstream", "connect_timeout", "connect-timeout",
           _positive(parse_duration), "10s", "Time allowed to connect to Glance."),
    Option("read_timeout", "upstream", "read_timeout", "read-timeout",
           _positive(parse_duration), "60s",
           "Longest silence allowed while reading from Glance (there is no total timeout)."),
    Option("retries", "upstream", "retries", "retries", _nonnegative_int, "3",
           "Times a broken image download is retried (resumed where it broke) before the "
           "fill fails."),
    Option("retry_backoff", "upstream", "retry_backoff", "retry-backoff",
           _nonnegative(parse_duration), "1s",
           "Wait before the first retry; doubled for each further one."),
    Option("proxy", "upstream", "proxy", "proxy", parse_proxy, "",
           "HTTP proxy (http://HOST:PORT) for image-data downloads only, e.g. a P2P "
           "engine such as Dragonfly's dfdaemon; empty: straight to Glance."),
    Option("ca_file", "upstream", "ca_file", "ca-file", parse_optional_path, "",
           "PEM CA bundle that https Glance certificates are verified against (empty: the "
           "system CA store)."),
    Option("cert_file", "upstream", "cert_file", "cert-file", parse_optional_path, "",
           "PEM client certificate presented to https Glance (may hold the key too)."),
    Option("key_file", "upstream", "key_file", "key-file", parse_optional_path, "",
           "PEM private key of cert_file, unencrypted (needs cert_file)."),
    Option("insecure", "upstream", "insecure", "insecure", parse_bool, "false",
           "Skip verifying Glance's https certificate (logs a warning at start)."),
    Option("tier_urls", "tier", "urls", "tier", parse_tier_urls, "",
           "Base URLs of the shared tier's nodes (reverse proxies of Glance's image data, "
           "such as Squid or Traffic Server), comma-separated; every compute node of a rack "
           "lists the same ones. Empty: fills go straight to Glance."),
    Option("tier_connect_timeout", "tier", "connect_timeout", "tier-connect-timeout",
           _positive(parse_duration), "2s",
           "Time allowed to connect to a tier node before the fill goes to the next source."),
    Option("tier_read_timeout", "tier", "read_timeout", "tier-read-timeout",
           _positive(parse_duration), "15s",
           "Longest silence from a tier node before the fill goes to the next source."),
    Option("tier_backoff", "tier", "backoff", "tier-backoff", _positive(parse_duration),
           "5s", "How long fills skip a tier node that could not be reached or went silent; "
           "doubled for each further failure in a row, at most 5 minutes."),
    Option("cache_dir", "cache", "dir", "cache-dir", Path, "/var/cache/imgcache",
           "Directory of the cache: image files, partial fills and the index."),
    Option("max_size", "cache", "max_size", "max-size", _positive(parse_size), "10G",
           "Hard cap on the bytes of cached images; larger images are streamed through."),
    Option("decision_ttl", "auth", "decision_ttl", "decision-ttl",
           _nonnegative(parse_duration), "30s",
           "How long Glance's 'allowed' for a (token, image), and Keystone's roles of a token "
           "for the cache API, are reused; 0 asks every time."),
    Option("policy_check", "auth", "policy_check", "policy-check", parse_policy_check,
           "download",
           "What imgcache asks Glance before serving a cached image: download (its "
           "download_image policy, by a one-byte data GET) or metadata (only get_image; for "
           "clouds whose download policy is no stricter)."),
    Option("scrub_interval", "cache", "scrub_interval", "scrub-interval",
           _nonnegative(parse_duration), "24h",
           "How often every cached image is re-hashed against its digest; 0 turns it off."),
    Option("scrub_rate", "cache", "scrub_rate", "scrub-rate", _positive(parse_size), "50M",
           "Most bytes per second the background scrub reads (it competes with clients)."),
    Option("drain_grace", "server", "drain_grace", "drain-grace",
           _nonnegative(parse_duration), "30s",
           "On SIGTERM, how long running downloads may go on before they are cut."),
    Option("admin_socket", "admin", "socket", "admin-socket", Path,
           "/run/imgcache/imgcache.sock",
           "Unix socket of the management API that the imgcache CLI talks to."),
    Option("admin_socket_mode", "admin", "socket_mode", "admin-socket-mode", parse_mode,
           "0600", "Permissions of the management socket (0600: its owner only; 0660 with "
           "socket_group)."),
    Option("admin_socket_group", "admin", "socket_group", "admin-socket-group", str, "",
           "Group given access to the management socket (empty: none)."),
    Option("cache_api_roles", "cache_api", "roles", "cache-api-roles", parse_roles, "admin",
           "Keystone roles (comma-separated) a token needs one of to use Glance's cache API "
           "(/v2/cache) on the listener; empty turns that API off (passed to Glance)."),
    Option("keystone_url", "cache_api", "keystone_url", "keystone-url", parse_optional_url, "",
           "Keystone URL that checks the cache API's tokens; empty: the one Glance names in "
           "its 401 answers (WWW-Authenticate: Keystone uri=...)."),
    Option("prefetch_concurrency", "admin", "prefetch_concurrency", "prefetch-concurrency",
           _positive(_nonnegative_int), "2", "Prefetches downloading at the same time."),
    Option("history_max_requests", "history", "max_requests", "history-max-requests",
           _nonnegative_int, "1000000",
           "Image requests kept in the access history (cache_dir/history, 32 bytes each) "
           "that imgcache sizing predicts from; 0 keeps none."),
    Option("predict_interval", "history", "predict_interval", "predict-interval",
           _nonnegative(parse_duration), "1h",
           "How often the imgcache_predicted_byte_hit_ratio gauges are recomputed from the "
           "history (needs imgcache[sizing]); 0 never."),
    Option("log_level", "logging", "level", "log-level", parse_log_level, "info",
           "Log level: debug, info, warning, error or critical."),
    Option("log_format", "logging", "format", "log-format", parse_log_format, "plain",
           "Log format: plain text lines, or json (one object per line)."),
)


@dataclass(frozen=True)
class Settings:
    """Validated settings of one imgcache process."""

    listen: tuple[str, int]
    metrics_listen: tuple[str, int]
    upstream: tuple[str, ...]
    connect_timeout: float
    read_timeout: float
    retries: int
    retry_backoff: float
    proxy: str | None
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    insecure: bool
    tier_urls: tuple[str, ...]
    tier_connect_timeout: float
    tier_read_timeout: float
    tier_backoff: float
    cache_dir: Path
    max_size: int
    decision_ttl: float
    policy_check: str
    scrub_interval: float
    scrub_rate: int
    drain_grace: float
    admin_socket: Path
    admin_socket_mode: int
    admin_socket_group: str
    cache_api_roles: frozenset[str]
    keystone_url: str | None
    prefetch_concurrency: int
    history_max_requests: int
    predict_interval: float
    log_level: str
    log_format: str


assert {f.name for f in fields(Settings)} == {o.name for o in OPTIONS}

ENV_CONFIG = "IMGCACHE_CONFIG"


def _read_ini(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except configparser.Error as exc:
        raise ConfigError(f"config file {path} is not valid INI: {exc}") from exc
    known = {(o.section, o.key): o for o in OPTIONS}
    values: dict[str, str] = {}
    for section in parser.sections():
        for key, value in parser.items(section):
            option = known.get((section, key))
            if option is None:
                raise ConfigError(
                    f"{path}: unknown key [{section}] {key}; known keys: "
                    + ", ".join(o.ini_name for o in OPTIONS)
                )
            values[option.name] = value
    return values


def _read_env(environ: Mapping[str, str]) -> dict[str, str]:
    by_env = {o.env: o for o in OPTIONS}
    values: dict[str, str] = {}
    for var, value in environ.items():
        if not var.startswith("IMGCACHE_") or var == ENV_CONFIG:
            continue
        option = by_env.get(var)
        if option is None:
            raise ConfigError(
                f"unknown environment variable {var}; known: "
                + ", ".join(sorted([*by_env, ENV_CONFIG]))
            )
        values[option.name] = value
    return values


def load_settings(
    flags: Mapping[str, str | None] | None = None,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults, the INI file, the environment and flags (``flags`` maps option names
    to strings, None meaning not given) and validate every value."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_CONFIG):
        config_file = Path(environ[ENV_CONFIG])
    layers: list[tuple[str, dict[str, str]]] = [
        ("default", {o.name: o.default for o in OPTIONS}),
    ]
    if config_file is not None:
        layers.append((str(config_file), _read_ini(config_file)))
    layers.append(("environment", _read_env(environ)))
    layers.append(("command line", {k: v for k, v in (flags or {}).items() if v is not None}))

    values: dict[str, Any] = {}
    for option in OPTIONS:
        source, text = next((s, layer[option.name]) for s, layer in reversed(layers)
                            if option.name in layer)
        try:
            values[option.name] = option.parse(text)
        except ValueError as exc:
            raise ConfigError(
                f"bad value {text!r} for {option.ini_name} (flag --{option.flag}, "
                f"env {option.env}) from {source}: {exc}"
            ) from exc
    if values["key_file"] is not None and values["cert_file"] is None:
        raise ConfigError("[upstream] key_file (flag --key-file, env IMGCACHE_KEY_FILE) is "
                          "set without [upstream] cert_file: give the client certificate too")
    return Settings(**values)
