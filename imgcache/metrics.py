"""Prometheus collectors of one imgcache app, on a registry of its own (so that several
apps in one process, as in tests, never share counters)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from imgcache.logs import dropped_log_records
from imgcache.mapped_windows import HOW_SENT

#: Labels of imgcache_requests_total / imgcache_served_bytes_total for image-data GETs.
RESULTS = ("hit", "miss", "coalesced", "bypass", "denied", "error")
#: Labels of imgcache_fills_total.
FILL_OUTCOMES = (
    "committed", "checksum_mismatch", "size_mismatch", "upstream_error", "refused",
    "disk_error", "commit_error", "cancelled", "internal_error",
)
#: Labels of imgcache_verifications_total: which check a committed fill passed.
VERIFY_METHODS = ("os_hash", "checksum", "size_only")
#: Caps, as multiples of the configured one, of imgcache_predicted_byte_hit_ratio.
PREDICTED_CAP_FACTORS = ("0.5", "1", "2", "4")
#: Windows of imgcache_working_set_bytes (durations as the config writes them).
WORKING_SET_WINDOWS = ("1d", "7d")
#: Kinds of imgcache_tier_failures_total: what went wrong at a tier node.
TIER_FAILURES = ("connect", "timeout", "broken", "status", "refused", "bad_answer", "size",
                 "checksum")


class Metrics:
    """Every metric imgcache exports; see the README's metrics table."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imgcache_requests", "Image-data GETs by result.", ["result"], registry=r)
        self.served_bytes = Counter(
            "imgcache_served_bytes", "Image bytes sent to clients by result.", ["result"],
            registry=r)
        self.upstream_bytes = Counter(
            "imgcache_upstream_bytes", "Image-data bytes received from Glance (fills and "
            "bypassed downloads).", registry=r)
        self.fills = Counter(
            "imgcache_fills", "Finished cache fills by outcome.", ["outcome"], registry=r)
        self.fill_resumes = Counter(
            "imgcache_fill_resumes", "Fills that continued after a broken transfer: by a "
            "Range request (range) or by downloading again and skipping (restart).",
            ["how"], registry=r)
        self.fill_reader_bytes = Counter(
            "imgcache_fill_reader_bytes", "Image bytes sent to the readers of downloads in "
            "flight (MISS, COALESCED), by how: copied from a mapping shared by the readers "
            "(mapped), else with sendfile because the stretch was still being written "
            "(unfinished), the mappings' bound was reached (no_room) or the file could not "
            "be mapped (map_failed).", ["how"], registry=r)
        for how in HOW_SENT:
            self.fill_reader_bytes.labels(how)
        self.fills_in_progress = Gauge(
            "imgcache_fills_in_progress", "Fills downloading now.", registry=r)
        self.cache_bytes = Gauge(
            "imgcache_cache_bytes", "Bytes of committed entries plus space reserved by fills.",
            registry=r)
        self.cache_max_bytes = Gauge(
            "imgcache_cache_max_bytes", "The configured hard cap.", registry=r)
        self.cache_pinned_bytes = Gauge(
            "imgcache_cache_pinned_bytes", "Bytes of pinned entries (never evicted).",
            registry=r)
        self.cache_over_cap_bytes = Gauge(
            "imgcache_cache_over_cap_bytes", "Bytes above the cap that cannot be evicted "
            "(pinned, or reserved by fills) after the cap was lowered below them.",
            registry=r)
        self.cache_entries = Gauge(
            "imgcache_cache_entries", "Committed cache entries.", registry=r)
        self.evictions = Counter(
            "imgcache_evictions", "Entries removed to make room (least recently used first).",
            registry=r)
        self.checksum_failures = Counter(
            "imgcache_checksum_failures", "Fills whose bytes did not match Glance's hash.",
            registry=r)
        self.disk_errors = Counter(
            "imgcache_disk_errors", "Failed writes to the cache directory (disk full, "
            "directory removed or read-only); caching pauses after each.", registry=r)
        self.verify_failures = Counter(
            "imgcache_verify_failures", "Cached files found corrupt by verify or the "
            "background scrub (and evicted).", registry=r)
        self.verified_bytes = Counter(
            "imgcache_verified_bytes", "Bytes of cached files re-hashed by verify or the "
            "background scrub.", registry=r)
        self.prefetches = Counter(
            "imgcache_prefetches", "Finished prefetches by outcome (cached, failed, withdrawn).",
            ["outcome"], registry=r)
        self.verifications = Counter(
            "imgcache_verifications", "Committed fills by the check they passed; size_only "
            "means Glance published no hash.", ["method"], registry=r)
        self.auth_checks = Counter(
            "imgcache_auth_checks", "Authorization answers: allowed/denied by Glance, or "
            "allowed_cached from the decision cache.", ["outcome"], registry=r)
        self.passthrough_requests = Counter(
            "imgcache_passthrough_requests", "Requests passed through to Glance untouched.",
            registry=r)
        self.upstream_errors = Counter(
            "imgcache_upstream_errors", "Failures talking to Glance by kind (connect, "
            "timeout, tls, broken).", ["kind"], registry=r)
        self.predicted_byte_hit_ratio = Gauge(
            "imgcache_predicted_byte_hit_ratio", "Byte hit ratio LRU would have had over the "
            "access history with the cap times cap_factor (NaN until first computed).",
            ["cap_factor"], registry=r)
        self.predicted_hit_ratio = Gauge(
            "imgcache_predicted_hit_ratio", "Request hit ratio LRU would have had over the "
            "access history with the cap times cap_factor (NaN until first computed).",
            ["cap_factor"], registry=r)
        self.working_set_bytes = Gauge(
            "imgcache_working_set_bytes", "Bytes of the distinct images requested within "
            "the window (1d, 7d).", ["window"], registry=r)
        for factor in PREDICTED_CAP_FACTORS:
            self.predicted_byte_hit_ratio.labels(factor).set(float("nan"))
            self.predicted_hit_ratio.labels(factor).set(float("nan"))
        for window in WORKING_SET_WINDOWS:
            self.working_set_bytes.labels(window)
        self.source_bytes = Counter(
            "imgcache_source_bytes", "Image bytes downloaded for fills (and their retries) "
            "by source: glance, or the URL of a tier node.", ["source"], registry=r)
        self.tier_failures = Counter(
            "imgcache_tier_failures", "Downloads that failed at a tier node and went on at "
            "the next source, by node and kind.", ["node", "kind"], registry=r)
        self.tier_node_up = Gauge(
            "imgcache_tier_node_up", "0 from a connection failure or silence at a tier "
            "node until it answers again (fills skip it for [tier] backoff), else 1.",
            ["node"], registry=r)
        self.tier_purges = Counter(
            "imgcache_tier_purges", "PURGE requests for corrupt objects in the tier, by "
            "outcome (purged, failed).", ["outcome"], registry=r)
        r.register(_DroppedLogRecords())
        # Children resolved once: labels() takes a lock and builds a key on every call,
        # and these are counted on every request.
        self._by_result = {result: (self.requests.labels(result),
                                    self.served_bytes.labels(result)) for result in RESULTS}
        self._auth_answers = {outcome: self.auth_checks.labels(outcome)
                              for outcome in ("allowed", "allowed_cached", "denied")}
        for outcome in FILL_OUTCOMES:
            self.fills.labels(outcome)
        for outcome in ("cached", "failed", "withdrawn"):
            self.prefetches.labels(outcome)
        for how in ("range", "restart"):
            self.fill_resumes.labels(how)
        for method in VERIFY_METHODS:
            self.verifications.labels(method)
        for kind in ("connect", "timeout", "tls", "broken"):
            self.upstream_errors.labels(kind)
        self.source_bytes.labels("glance")
        for outcome in ("purged", "failed"):
            self.tier_purges.labels(outcome)

    def count_request(self, result: str, sent: int) -> None:
        """One image-data GET answered with ``result`` (one of RESULTS), ``sent`` image
        bytes sent."""
        requests, served = self._by_result[result]
        requests.inc()
        served.inc(sent)

    def count_auth_answer(self, outcome: str) -> None:
        """One authorization answer: allowed, allowed_cached or denied."""
        self._auth_answers[outcome].inc()

    def add_tier_node(self, url: str) -> None:
        """Export the per-node series of a configured tier node from the start (at 0)."""
        self.source_bytes.labels(url)
        self.tier_node_up.labels(url).set(1)
        for kind in TIER_FAILURES:
            self.tier_failures.labels(url, kind)


class _DroppedLogRecords(Collector):
    """imgcache_log_records_dropped_total, read from the process's log writer at each
    scrape (one writer per process, whatever the apps)."""

    def describe(self) -> Iterator[CounterMetricFamily]:
        """The metric's name and help, for the registry's checks."""
        yield _dropped_log_records_family(0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The count now."""
        yield _dropped_log_records_family(dropped_log_records())


def _dropped_log_records_family(count: int) -> CounterMetricFamily:
    return CounterMetricFamily(
        "imgcache_log_records_dropped", "Log records dropped because stderr took no more "
        "(journald fell behind) or writing to it failed; the log says how many once it "
        "takes lines again.", value=count)
