"""The server's Prometheus metrics, in a registry of its own (one per app, so several apps in one
process, as in the tests, never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from a 1-layer model on a laptop (~1 ms) to a 1.5B one on a Jetson (~1 s).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)


class Metrics:
    """Requests by route and status, tokens in and out, queue depth, batch occupancy, KV tokens
    allocated, prefix-cache hits, drafted and accepted tokens of speculative decoding, and the
    time-to-first-token and inter-token latency histograms."""

    def __init__(
        self,
        max_batch: int,
        queue_depth: Callable[[], float],
        active: Callable[[], float],
        kv_tokens: Callable[[], float] | None = None,
        kv_budget: int | None = None,
        draft_kv_tokens: Callable[[], float] | None = None,
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gpt2_edge_requests",
            "HTTP requests by route and response status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gpt2_edge_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generation_tokens = Counter("gpt2_edge_generation_tokens", "Tokens generated", registry=r)
        self.sequences_finished = Counter(
            "gpt2_edge_sequences_finished",
            "Sequences that left the batch, by reason (eos, stop, length, cancelled, error)",
            ["reason"],
            registry=r,
        )
        Gauge("gpt2_edge_queue_depth", "Sequences waiting for a batch slot", registry=r).set_function(
            queue_depth
        )
        Gauge("gpt2_edge_batch_active", "Sequences holding a batch slot", registry=r).set_function(active)
        Gauge("gpt2_edge_batch_slots", "Batch slots (--max-batch)", registry=r).set(max_batch)
        if kv_tokens is not None:
            Gauge(
                "gpt2_edge_kv_tokens_allocated",
                "KV-cache positions allocated (slots x tokens per slot; a concatenating cache: held)",
                registry=r,
            ).set_function(kv_tokens)
        if kv_budget is not None:
            Gauge("gpt2_edge_kv_budget_tokens", "KV-cache positions at most (--kv-budget)", registry=r).set(
                kv_budget
            )
        if draft_kv_tokens is not None:
            Gauge(
                "gpt2_edge_draft_kv_tokens_allocated",
                "The draft model's KV-cache positions allocated (--draft; the server's slots x tokens per "
                "slot, not counted in --kv-budget)",
                registry=r,
            ).set_function(draft_kv_tokens)
        self.prefix_cache_lookups = Counter(
            "gpt2_edge_prefix_cache_lookups",
            "Admitted prompts looked up in the prefix cache, by result (hit, miss)",
            ["result"],
            registry=r,
        )
        self.prefix_cache_tokens = Counter(
            "gpt2_edge_prefix_cache_reused_tokens",
            "Prompt tokens not prefilled: their KV was reused",
            registry=r,
        )
        self.spec_drafted_tokens = Counter(
            "gpt2_edge_spec_decode_draft_tokens",
            "Tokens drafted for speculative decoding (prompt lookup or the draft model) and verified",
            registry=r,
        )
        self.spec_accepted_tokens = Counter(
            "gpt2_edge_spec_decode_accepted_tokens",
            "Drafted tokens the model accepted (each one a decode step saved)",
            registry=r,
        )
        self.batch_occupancy = Histogram(
            "gpt2_edge_batch_occupancy",
            "Active sequences per decode step",
            buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch}),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "gpt2_edge_time_to_first_token_seconds",
            "From admission to the queue to the first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "gpt2_edge_inter_token_latency_seconds",
            "Between two steps that give one sequence tokens (a speculative step may give several)",
            buckets=ITL_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
