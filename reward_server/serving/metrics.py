"""The server's metrics in Prometheus' text format, on server.metrics_port, beside Triton's own.

prometheus-client serves the port; Triton's metrics (request counts and queue times per model, ...) move to
server.triton_metrics_port on the loopback, and each scrape of ours includes them (TritonMetrics), so one port has
both. Ours: queue depth (Triton batches, tokens) at rank 0, forwards and how full they were, tokens received and
computed (fewer with prefix sharing), tokens reused from the prefix cache, errors by kind, sequences and tokens of
withdrawn requests taken out of the queue uncomputed, the API port's requests by route and status and its
withdrawals by reason; tokens/s is rate(reward_server_tokens_received_total[1m]).
"""

import logging
import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

FILL_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 2.0)  # tokens computed per forward / budget (> 1: one long sequence)


class TritonMetrics:
    """A collector that reads Triton's own metrics at each scrape."""

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s

    def collect(self):
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except OSError as exc:
            log.debug("Triton's metrics unavailable: %s", exc)
            return
        yield from text_string_to_metric_families(text)


def triton_pending(url: str, timeout_s: float) -> dict:
    """Requests waiting in Triton's queue, per model name (nv_inference_pending_request_count); {} if unknown."""
    pending: dict = {}
    for family in TritonMetrics(url, timeout_s).collect():
        if family.name == "nv_inference_pending_request_count":
            for sample in family.samples:
                model = sample.labels.get("model", "")
                pending[model] = pending.get(model, 0) + int(sample.value)
    return pending


class Metrics:
    def __init__(self):
        self.triton_url, self.timeout_s = "", 0.0  # Triton's own metrics, once serving
        self.registry = CollectorRegistry()
        r = self.registry
        self.queued_batches = Gauge("reward_server_queue_batches", "Triton batches at rank 0 not answered yet",
                                     registry=r)
        self.queued_tokens = Gauge("reward_server_queue_tokens", "Tokens of the requests at rank 0 not answered yet",
                                   registry=r)
        self.peak_queued_tokens = Gauge("reward_server_queue_tokens_peak", "The most tokens queued at rank 0 so far "
                                        "(batching.max_queued_tokens bounds it, or one request alone)", registry=r)
        self.forwards = Counter("reward_server_forwards", "Forwards run", registry=r)
        self.sequences = Counter("reward_server_sequences", "Sequences scored", registry=r)
        self.received = Counter("reward_server_tokens_received", "Tokens of the scored sequences", registry=r)
        self.computed = Counter("reward_server_tokens_computed",
                                "Tokens computed, all replicas (received minus those of shared prefixes computed once "
                                "and those taken from the prefix cache)", registry=r)
        self.reused = Counter("reward_server_tokens_reused", "Tokens taken from the prefix cache (computed by earlier "
                              "forwards) instead of computed, all replicas", registry=r)
        self.fill = Histogram("reward_server_forward_fill", "Tokens computed per forward / the forward's token budget",
                              buckets=FILL_BUCKETS, registry=r)
        self.errors = Counter("reward_server_errors", "Failed requests and rows, by kind: input (HTTP 400 or a row's "
                              "error), unavailable (503), internal (500)", ["kind"], registry=r)
        self.withdrawn_sequences = Counter(
            "reward_server_withdrawn_sequences", "Sequences of withdrawn requests (the caller disconnected, or "
            "server.request_timeout_s passed) taken out of the queue before any forward computed them", registry=r)
        self.withdrawn_tokens = Counter("reward_server_withdrawn_tokens", "Tokens of those sequences", registry=r)
        self.api_requests = Counter("reward_server_api_requests", "Requests answered on the API port "
                                    "(server.api_port) and the OpenRLHF port, by route and HTTP status",
                                    ["route", "status"], registry=r)
        self.api_withdrawn = Counter("reward_server_api_withdrawn", "Requests on those ports withdrawn before they "
                                     "were answered, by reason: disconnected (the client went away), timeout "
                                     "(server.request_timeout_s: answered 504)", ["reason"], registry=r)
        # model.quantization's start-up fidelity gate (loading/fidelity_gate.py), per label: quantized vs unquantized
        self.fidelity = {key: Gauge(f"reward_server_quantization_{name}", f"{what}, quantized vs unquantized rewards "
                                    "of the start-up calibration sample (worst rank)", ["label"], registry=r)
                         for key, name, what in (("spearman", "spearman", "Spearman's rank correlation"),
                                                 ("pair_agreement", "pairs_alike", "Share of pairs ordered alike"),
                                                 ("max_abs_diff", "max_abs_diff", "Largest |difference|"),
                                                 ("mean_abs_diff", "mean_abs_diff", "Mean |difference|"))}

    def quantization_fidelity(self, labels: dict) -> None:
        for label, figures in labels.items():
            for key, gauge in self.fidelity.items():
                gauge.labels(label).set(figures[key])

    def watch_queue(self, leader) -> None:
        self.queued_batches.set_function(lambda: leader.queued_batches)
        self.queued_tokens.set_function(lambda: leader.queued_tokens)
        self.peak_queued_tokens.set_function(lambda: leader.peak_queued_tokens)

    def forward(self, n_seqs: int, n_tokens: int, n_computed: int, budget: int) -> None:
        self.forwards.inc()
        self.sequences.inc(n_seqs)
        self.received.inc(n_tokens)
        self.computed.inc(n_computed)
        if budget:
            self.fill.observe(n_computed / budget)

    def withdrawn(self, n_seqs: int, n_tokens: int) -> None:
        self.withdrawn_sequences.inc(n_seqs)
        self.withdrawn_tokens.inc(n_tokens)

    def api_request(self, route: str, status: int) -> None:
        self.api_requests.labels(route, str(status)).inc()

    def api_withdrawal(self, reason: str) -> None:
        self.api_withdrawn.labels(reason).inc()

    def triton_queued(self) -> dict:
        return triton_pending(self.triton_url, self.timeout_s) if self.triton_url else {}

    def error(self, kind: str, n: int = 1) -> None:
        self.errors.labels(kind).inc(n)

    def serve(self, host: str, port: int, triton_url: str, timeout_s: float) -> None:
        self.triton_url, self.timeout_s = triton_url, timeout_s
        self.registry.register(TritonMetrics(triton_url, timeout_s))
        start_http_server(port, addr=host, registry=self.registry)
