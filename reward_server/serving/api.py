"""The API port (server.api_port, on by default at 30000): an aiohttp server on rank 0, beside Triton, answering the
reward routes that engines' clients and RL frameworks call (docs/frameworks.md). Each route is a thin adapter
(vllm_api.py, sglang_api.py, slime_api.py, openrlhf.py; api_routes.py puts them together) over the same typed service
as Triton's models: same checks, limits, tokenizer, batching, prefix sharing and cache, metrics.

What every route shares lives here:
- auth: with an inference token (server.inference_token_*), `Authorization: Bearer <token>` or the
  `triton-access-token` header, else 401 with one line; GET /health is open.
- gathering: requests that arrive within `gather_s` of the first (batching.max_queue_delay_us, up to `max_batch`
  requests) go to the leader as one batch, as Triton's dynamic batcher sends its batches, so that the one-sample
  requests of a GRPO group meet in one forward and share their prompt.
- deadlines and disconnects: a request not answered within server.request_timeout_s gets 504; a client that goes
  away cancels its handler (aiohttp's handler_cancellation); either way the request is withdrawn (Leader.withdraw):
  its sequences that no forward has taken leave the queue uncomputed.
- errors: one line in the route's own shape (ApiError, `error_body`), 503 with Retry-After, never a traceback.
- GET /health (and SGLang's /health_generate): 200 once ready, 503 before, and from the first moment of a drain or
  a failure of the ranks (drain.Admission.health).
"""

import asyncio
import contextlib
import hmac
import inspect
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional

from ..engine.admission import Withdrawn
from ..protocol import INTERNAL, encode_error
from .requests import ScoreRequest, ScoreResult
from .api_errors import DEFAULT_RETRY_AFTER_S, ApiError, dumps, error_body, failure

log = logging.getLogger("reward_server.api")

ACCESS_HEADER = "triton-access-token"  # serving/triton.py's, accepted here too


class Job:
    """One request on its way to the service: `decode` (on a worker thread) makes its ScoreRequest; `fut` is the
    leader's future once submitted; `withdrawn` once the caller gave up."""

    def __init__(self, decode: Callable[[], ScoreRequest], done: "asyncio.Future"):
        self.decode, self.done = decode, done
        self.request: Optional[ScoreRequest] = None
        self.fut: Optional[Future] = None
        self.withdrawn: Optional[Withdrawn] = None

    def tokens(self) -> int:
        """Tokens of the request's decoded rows."""
        return sum(len(r) for r in (self.request.rows if self.request else []) if not isinstance(r, Exception))


class ApiServer:
    """An aiohttp server in a thread of its own (with its own event loop), scoring through `service`."""

    def __init__(self, service, host: str, port: int, token: Optional[str], timeout_s: Optional[float],
                 gather_s: float, max_batch: int, concurrency: int, name: str = "API port", port_wait_s: float = 0.0):
        self.service, self.host, self.port = service, host, port
        self.leader = getattr(service, "leader", None)  # None: a stand-in service (tests)
        self.metrics = getattr(service, "metrics", None)
        self.token, self.timeout_s = token, timeout_s
        self.gather_s, self.max_batch = gather_s, max(1, max_batch)
        self.name, self.port_wait_s = name, port_wait_s
        self.routes: List[tuple] = []  # (method, path, handler) as registered
        self.started = False  # GET /health: 503 until the server is ready (app.py)
        self._workers = ThreadPoolExecutor(concurrency, thread_name_prefix="api")
        self._gathered: List[Job] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None

    # ------------------------------------------------------------ routes

    def add(self, method: str, path: str, handler, family: str, route: Optional[str] = None, auth: bool = True):
        """Serve `handler(request) -> web.Response` at `path`, its errors in `family`'s shape, counted as `route`."""
        self.routes.append((method, path, self._wrapped(handler, family, route or path, auth)))

    def add_health(self) -> None:
        for path in ("/health", "/health_generate"):
            self.add("GET", path, self._health, "plain", "/health", auth=False)

    def ready(self) -> None:
        self.started = True

    def _wrapped(self, handler, family: str, route: str, auth: bool):
        from aiohttp import web

        async def wrapped(request):
            request["deadline"] = time.monotonic() + self.timeout_s if self.timeout_s else None
            try:
                if auth:
                    self._authorize(request)
                try:
                    response = await handler(request)
                except web.HTTPException as exc:  # aiohttp's own (a body over the size limit): one line, our shape
                    raise ApiError(exc.status, encode_error("INVALID_ARG" if exc.status < 500 else INTERNAL,
                                                            exc.reason)) from None
            except ApiError as exc:  # `family` set on it: a route answering another engine's body (api_routes.py)
                shape = getattr(exc, "family", None) or family
                response = web.Response(text=dumps(error_body(shape, exc.status, str(exc), exc.param)),
                                        status=exc.status, content_type="application/json")
                if exc.retry_after is not None:
                    response.headers["Retry-After"] = str(exc.retry_after)
            except Exception:  # our own bug: one line to the caller, the traceback in our log
                log.exception("%s %s failed", request.method, request.path)
                message = encode_error(INTERNAL, "the reward server failed on this request; see its log")
                response = web.Response(text=dumps(error_body(family, 500, message)), status=500,
                                        content_type="application/json")
            admission = getattr(self.service, "admission", None)
            if admission is not None and admission.health() is not None:  # draining or failed: this port
                response.force_close()  # closes soon, so `Connection: close` now: no keep-alive left to cut later
            if self.metrics is not None and hasattr(self.metrics, "api_request"):
                self.metrics.api_request(route, response.status)
            return response

        return wrapped

    def _authorize(self, request) -> None:
        if not self.token:
            return
        bearer = request.headers.get("Authorization", "")
        offered = [bearer[7:].strip() if bearer[:7].lower() == "bearer " else "", request.headers.get(ACCESS_HEADER, "")]
        if not any(o and hmac.compare_digest(o.encode(), self.token.encode()) for o in offered):
            raise ApiError(401, "inference needs the server's token: send the header `Authorization: Bearer <token>` "
                                f"(or `{ACCESS_HEADER}: <token>`)")

    async def _health(self, request):
        from aiohttp import web

        why = None if self.started else "the reward server is starting"
        why = why or self.service.admission.health()
        if why:
            raise ApiError(503, why, retry_after=DEFAULT_RETRY_AFTER_S)
        return web.Response(status=200)

    # ------------------------------------------------------------ scoring

    async def score(self, request, decode: Callable[[], ScoreRequest]) -> "tuple[ScoreResult, Job]":
        """Score the ScoreRequest that `decode()` makes (on a worker thread, with the drain's admission rule),
        gathered with the requests that arrive with it; withdrawn if the caller disconnects (the handler is
        cancelled) or the deadline passes (ApiError 504)."""
        job = Job(decode, asyncio.get_running_loop().create_future())
        self._gathered.append(job)
        if len(self._gathered) >= self.max_batch or self.gather_s <= 0:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.gather_s, self._flush)
        deadline = request.get("deadline")
        try:
            if deadline is None:
                return await job.done, job
            return await asyncio.wait_for(asyncio.shield(job.done), max(0.0, deadline - time.monotonic())), job
        except asyncio.TimeoutError:
            self.withdraw(job, Withdrawn(f"not scored within server.request_timeout_s={self.timeout_s:g} s; its rows "
                                         "left the queue uncomputed", "timeout"))
            raise failure(job.withdrawn) from None
        except asyncio.CancelledError:  # the client went away
            self.withdraw(job, Withdrawn("the client disconnected", "disconnected"))
            raise

    def withdraw(self, job: Job, exc: Withdrawn) -> None:
        """The caller gave up: a job not submitted yet never is; a submitted one leaves the leader's queue."""
        job.withdrawn = exc
        fut = job.fut
        if fut is not None and self.leader is not None:
            self.leader.withdraw(fut, exc)
        if self.metrics is not None and hasattr(self.metrics, "api_withdrawal"):
            self.metrics.api_withdrawal(exc.cause)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        jobs, self._gathered = [j for j in self._gathered if j.withdrawn is None], []
        for start in range(0, len(jobs), self.max_batch):
            self._workers.submit(self._run, jobs[start:start + self.max_batch])

    def _run(self, jobs: List[Job]) -> None:
        """On a worker thread: decode each job, then score them together; each job's result goes to its waiter."""
        try:
            live = []
            for job in jobs:
                if job.withdrawn is None:
                    job.request = self._decoded(job)
                    live.append(job)
            submitted = [j for j in live if j.request.error is None]

            def hook(futures: List[Future]) -> None:  # Leader.submitting: each submitted job's future, in order
                for job, fut in zip(submitted, futures):
                    job.fut = fut
                    if job.withdrawn is not None:  # gave up while being decoded or submitted
                        self.leader.withdraw(fut, job.withdrawn)

            requests = [j.request for j in live]
            with self.leader.submitting(hook) if self.leader is not None else contextlib.nullcontext():
                if len(requests) == 1:
                    results = [self.service.score(requests[0])]
                else:
                    results = self.service.score_batch(requests) if requests else []
            for job, result in zip(live, results):
                self._deliver(job, result)
        except BaseException as exc:  # our own bug: every job of the batch
            log.exception("a batch of %d API request(s) failed", len(jobs))
            for job in jobs:
                self._deliver(job, ScoreResult(error=exc))

    def _decoded(self, job: Job) -> ScoreRequest:
        admit, refusal = self.service.admission.admit([None], "api")  # never in Triton's queue: refused once draining
        if not admit[0]:
            return ScoreRequest(error=refusal)
        return job.decode()

    def _deliver(self, job: Job, result: ScoreResult) -> None:
        def done() -> None:
            if not job.done.done():
                job.done.set_result(result)

        self._loop.call_soon_threadsafe(done)

    # ------------------------------------------------------------ serving

    def start(self) -> None:
        """Listen (after waiting up to port_wait_s for a previous server to release the port); the actual port
        (server.api_port=0: a free one) is `self.port` afterwards."""
        if self.port and self.port_wait_s:
            from .triton import wait_for_ports

            wait_for_ports(self.host, [self.port], self.port_wait_s)
        threading.Thread(target=self._serve, name=f"{self.name.replace(' ', '-')}", daemon=True).start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"{self.name}: cannot listen on {self.host}:{self.port}: {self._error}") from None

    def _serve(self) -> None:
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        rules = getattr(self.service.decoder, "rules", None)
        limit = (getattr(rules, "max_request_bytes", 0) or 0) * 4 + (1 << 20)  # JSON escapes: up to 4x the UTF-8
        app = web.Application(client_max_size=limit)
        for method, path, handler in self.routes:
            app.router.add_route(method, path, handler)
        # handler_cancellation: a client that disconnects cancels its handler (aiohttp >= 3.9 asks for it; before, always)
        cancel = "handler_cancellation" in inspect.signature(web.Server.__init__).parameters
        runner = web.AppRunner(app, access_log=None, **({"handler_cancellation": True} if cancel else {}))
        try:
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
            self.port = runner.addresses[0][1] if runner.addresses else self.port
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._runner = runner
        self._loop.run_forever()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop listening (a new connection is refused before anything is sent), answer the requests in flight (at
        most `timeout_s`), close the connections left (idle: every answer of a drain says `Connection: close`) and
        end the server's thread. The drain calls it before Triton stops (drain.py)."""
        if self._loop is None or getattr(self, "_runner", None) is None:
            return
        closing = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # a connection still open: stop anyway
            closing.result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._workers.shutdown(wait=False)
