"""One rank's parts, built in named phases: load the scorer, build the engine, and on rank 0 the leader, the
service and its front doors (Triton, OpenRLHF); then serve until shutdown. cli.py is the entry point."""

import logging
import os
import signal
import sys
import threading
import time

from . import distributed as d
from . import faults
from .config import ModelInfo, ServeConfig, resolve
from .engine import Engine, Leader, run_subscriber
from .kinds import kind_of
from .loading import fidelity_gate, quantization
from .loading.checkpoint import StartupError
from .scoring import invariant
from .scoring.affinity import ReplicaAffinity
from .scoring.scorer import warm_up
from .serving import lifecycle
from .serving.api_routes import api_server, ready_text
from .serving.inputs import SequenceRules
from .serving.drain import drain_then_stop
from .serving.metrics import Metrics
from .serving.openrlhf import OpenRLHFEndpoint
from .serving.service import RewardService
from .serving.triton import (ACCESS_HEADER, pick_free_ports, ready_line, resolve_access_token,
                             resolve_inference_token, start_triton)
from .serving.watchdog import Watchdog

log = logging.getLogger("reward_server")



def exit_with_launcher() -> None:
    """torchrun starts each rank in a session of its own; if torchrun itself is killed (SIGKILL, OOM killer)
    its ranks would live on as orphans. Ask Linux to send SIGTERM when the parent dies, which drains and exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_before_ready(signum, _frame) -> None:
    """SIGTERM / SIGINT while the rank starts (loading, warm-up): nothing was accepted yet, so nothing to drain;
    leave at once with exit code 0 (rank 0's Triton, if started, goes with it: lifecycle.py)."""
    log.info("signal %d before the server was ready: rank %s stops", signum, os.environ.get("RANK", "0"))
    logging.shutdown()
    os._exit(0)


def serve(cfg: ServeConfig) -> int:
    """Run one rank until shutdown; returns the process exit code."""
    exit_with_launcher()
    signal.signal(signal.SIGTERM, stop_before_ready)  # until the subscriber's or the drain's own handling
    signal.signal(signal.SIGINT, stop_before_ready)
    started = time.monotonic()
    kind = kind_of(cfg.reward.kind)
    topo = d.init_distributed(cfg.parallel)
    inference_token = resolve_inference_token(cfg) if topo.is_leader else None  # fail before the long load
    quantization.use_stand_in(cfg.fault_injection.quantization_noise)  # TEST ONLY; 0: torchao
    try:
        scorer, tokenizer, model_config = kind.load(cfg, topo)
    except StartupError as exc:  # what to change, in one line; every rank finds the same
        if topo.is_leader:
            log.error("cannot start: %s", exc)
        return 2
    # every "auto" setting, by the rules in config/resolve.py (the loader applied the same rules for its own)
    r = resolve(cfg, topo.device.type, topo.tp_size, topo.dp_size, ModelInfo.of(model_config, type(scorer.backbone)),
                rank=topo.rank)
    gate = None
    if cfg.model.quantization:  # the fidelity gate: the same sample, figures and verdict on every rank
        try:
            gate = fidelity_gate.run(scorer, tokenizer, cfg.model, topo.device, cfg.batching.max_tokens_per_forward,
                                     r.max_length, model_config.vocab_size, topo.is_leader)
        except StartupError as exc:
            if topo.is_leader:
                log.error("cannot start: %s", exc)
            return 2
    attn = model_config._attn_implementation
    if r.warmup:
        start = time.monotonic()
        warm_up(scorer, model_config.vocab_size, cfg.batching.max_tokens_per_forward)
        if topo.is_leader:
            log.info("warm-up done in %.1f s", time.monotonic() - start)
    elif topo.is_leader:
        log.info("warm-up skipped: nothing to compile on the %s with %s attention (batching.warmup=true runs it)",
                 topo.device.type, attn)
    if cfg.batching.batch_invariant:  # the same bits alone and batched on this machine's kernels, or no start
        try:
            invariant.self_test(scorer, model_config.vocab_size, cfg.batching.max_tokens_per_forward)
        except StartupError as exc:
            if topo.is_leader:
                log.error("cannot start: %s", exc)
            return 2
        if topo.is_leader:
            log.info("batch-invariant mode: the self-test found the same bits alone and batched")
    layout = scorer.layout
    if topo.is_leader:
        log.info("layout %s%s, forwards of up to %d tokens computed per replica", layout.kind,
                 " with prefix sharing" if layout.sharing else "", cfg.batching.max_tokens_per_forward)
    affinity = None
    if cfg.batching.replica_affinity and topo.dp_size > 1 and scorer.cache is not None:
        affinity = ReplicaAffinity(topo.dp_size, scorer.cache.capacity, layout.min_shared)
    standin = None
    if faults.standin_enabled(cfg.fault_injection):  # TEST ONLY: no model runs, each forward takes a GPU's time
        scorer = standin = faults.StandInScorer(scorer, cfg.fault_injection.standin, topo.rank)
    if faults.enabled(cfg.fault_injection):
        scorer = faults.FaultInjectingScorer(scorer, cfg.fault_injection, topo.rank)
    engine = Engine(scorer, topo, layout, affinity)
    if standin is not None:
        engine = faults.StandInEngine(engine, standin)
    peers = d.peer_processes()
    if not topo.is_leader:
        # torchrun signals every rank; subscribers wait for rank 0's SHUTDOWN so in-flight batches finish.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        run_subscriber(engine)
        d.say_goodbye()
        d.shutdown()
        log.info("rank %d exited cleanly", topo.rank)
        return 0

    rules = SequenceRules(model_config.vocab_size, r.max_length, cfg.model.truncation, r.max_row_bytes,
                          r.max_request_bytes)
    budget = cfg.batching.max_tokens_per_forward * topo.dp_size
    metrics = Metrics()
    if gate is not None:
        metrics.quantization_fidelity(gate["labels"])
    overlap = r.overlap or (standin is not None and cfg.batching.overlap)  # the stand-in's forwards overlap as on a GPU
    leader = Leader(engine, cfg.parallel.heartbeat_s, budget, overlap, cfg.server.stats_log_s, layout.sharing,
                    layout.min_shared, r.max_queued_tokens, metrics)
    metrics.watch_queue(leader)
    service = RewardService(leader, kind.decoder(cfg, scorer, tokenizer, rules), kind.outputs(cfg, scorer, model_config),
                            metrics)
    watchdog = Watchdog(leader, service, cfg.parallel.timeout_s, peers)
    watchdog.start()
    instances = r.instances
    with d.heartbeats(cfg.parallel.heartbeat_s), lifecycle.triton_process_group() as reaper:  # noqa: F841
        pick_free_ports(cfg.server)  # the ports set to 0
        cfg.server.triton_metrics_port = r.triton_metrics_port
        api = None
        if cfg.server.api_port is not None:  # listening before Triton starts: GET /health answers 503 until ready
            api = api_server(cfg, service, tokenizer, model_config, inference_token, r.max_length)
            api.start()
            cfg.server.api_port = api.port  # 0: the free port it took
        triton = start_triton(cfg, service, instances, resolve_access_token(cfg), inference_token)  # reaper: lifecycle.py
    ports = [api] if api is not None else []
    if cfg.server.openrlhf_port is not None:
        openrlhf = OpenRLHFEndpoint(service, tokenizer, cfg.server.host, cfg.server.openrlhf_port,
                                    cfg.server.openrlhf_eos, cfg.server.openrlhf_concurrency, inference_token,
                                    ACCESS_HEADER, cfg.server.request_timeout_s)
        openrlhf.start()
        ports.append(openrlhf.api)
    log.info(ready_line(cfg, time.monotonic() - started) + (ready_text(api) if api is not None else ""))
    if api is not None:
        api.ready()
    lifecycle.write_pid()  # for the reward-server launcher, which stops the server through rank 0
    draining = threading.Event()

    def drain(signum, _frame):
        # after the group failed (torchrun then signals the other ranks) it exits at once, and new requests are
        # refused with the failure's cause, not "shutting down"
        if draining.is_set() or leader.failed is not None:
            return
        draining.set()
        service.admission.not_ready("the reward server is draining")  # GET /health fails before the first refusal
        log.info("signal %d: draining and shutting down", signum)

        signalled = time.monotonic()
        threading.Thread(target=drain_then_stop, args=(cfg.server, service, leader, metrics, triton, signalled, ports),
                         name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    try:
        leader.run()
    except BaseException as exc:
        log.exception("the reward ranks failed; exiting")
        watchdog.exit_after_failure(exc)  # does not return
        return 1
    for watcher in watchdog.peer_watchers:  # the subscribers' goodbyes
        watcher.join(timeout=cfg.parallel.heartbeat_s)
    d.shutdown()
    log.info("rank 0 exited cleanly")
    return 0
