"""Issue #29 (2, 3): a wrong URL is reported in seconds, naming the URL and the cause, and whatever the client raises
for a server's failure is one of its own exceptions (RewardServerError), the cause chained.

A server never seen answering as a reward server gets `wait_for_server_s` (10 s by default): a closed port, a
host name that does not resolve, a host answering 404 to everything, a Triton server without the model, something
that does not speak HTTP/1.1; an answer that cannot be a server starting up (a metrics port's text, a 501) is
reported at once. A server started a few seconds after the first call is still waited for; a server seen once
keeps the restart ride-through (restart_budget_s) even when it is gone longer than wait_for_server_s. In a pool,
a server never seen does not hold up the others. In-process servers (http.server on loopback ports), then one
real server (torchrun, 2 ranks, the default model): its metrics and gRPC ports, and its HTTP port reached
through a proxy that starts listening 3 s after the first call."""

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from servers import DelayedProxy, free_port, running_server
from reward_server.client import (RemoteGPTRMClient, RewardServerError, RewardServerNotFound,
                                  RewardServerUnavailable)

pytestmark = pytest.mark.timeout(300)


def handler(do):
    """A quiet HTTP/1.1 handler class: do(handler, method) -> (status, body bytes, content type)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length)
            status, body, kind = do(self, self.command)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

    return Handler


class Http:
    """An http.server on a loopback port (`port`: that one, e.g. to start it after a call)."""

    def __init__(self, do, port: int = 0):
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler(do))
        self.port = self.server.server_address[1]
        self.url = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def not_found(h, method):
    return 404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html"


def metrics_like(h, method):
    """What a Prometheus endpoint answers: its text to every GET, 501 to a POST."""
    if method == "GET":
        return 200, b"# HELP reward_server_requests_total ...\nreward_server_requests_total 3\n", "text/plain"
    return 501, b"<!DOCTYPE HTML><html><body>Unsupported method ('POST')</body></html>", "text/html"


def triton_without_the_model(ready: bool):
    def do(h, method):
        if h.path == "/v2/health/ready":
            return (200 if ready else 400), b"", "text/plain"
        return 404, json.dumps({"error": "Request for unknown model: 'reward' is not found"}).encode(), \
            "application/json"
    return do


def good_triton(h, method):
    """A reward server's answers, JSON-encoded: reward = number of bytes of each row."""
    if method == "GET":
        return 200, json.dumps({"name": "reward", "max_batch_size": 4,
                                "output": [{"name": "rewards", "dims": ["1"]}]}).encode(), "application/json"
    header_length = int(h.headers["Inference-Header-Content-Length"])
    request = json.loads(h.body[:header_length])
    n = request["inputs"][0]["shape"][0]
    blob, rows, at = h.body[header_length:], [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at:at + 4], "little")
        rows.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    answer = {"model_name": "reward", "outputs": [
        {"name": "rewards", "datatype": "FP32", "shape": [n, 1], "data": [float(len(r)) for r in rows]},
        {"name": "error", "datatype": "BYTES", "shape": [n, 1], "data": [""] * n}]}
    return 200, json.dumps(answer).encode(), "application/json"


def closed_port() -> int:
    return free_port()  # nothing listens there


def failure(url, timeout=60, **kw):
    """(the exception, seconds) of scoring one text at `url`."""
    start = time.monotonic()
    with RemoteGPTRMClient(url, **kw) as client:
        with pytest.raises(RewardServerError) as info:
            client.score(["hello"], timeout=timeout)
    return info.value, time.monotonic() - start


# --------------------------------------------------------------------------------------- never seen: wrong URLs


def test_a_closed_port_is_reported_after_wait_for_server_s():
    port = closed_port()
    exc, seconds = failure(f"127.0.0.1:{port}")  # the defaults: wait_for_server_s=10
    print(f"closed port reported after {seconds:.1f} s: {exc}")
    assert 9.5 <= seconds < 15
    assert type(exc) is RewardServerUnavailable and (exc.code, exc.reason) == (None, "cannot_connect")
    message = str(exc)
    assert message.startswith(f"reward server http://127.0.0.1:{port} unavailable for model config: cannot connect")
    assert "Connection refused" in message and "wait_for_server_s=10" in message, message
    assert isinstance(exc.__cause__, ConnectionRefusedError)


def test_a_host_answering_404_is_reported_as_not_triton():
    server = Http(not_found)
    try:
        exc, seconds = failure(server.url)
        print(f"404 host reported after {seconds:.1f} s: {exc}")
        assert 9.5 <= seconds < 15
        assert type(exc) is RewardServerNotFound and exc.reason == "not_triton"
        assert str(exc).startswith(f"reward server http://{server.url} not found for model config: HTTP 404 for "
                                   f"GET /v2/models/reward/config, not from a Triton server"), str(exc)
        assert "not a Triton server: check the host and port" in str(exc)
        exc, seconds = failure(server.url, max_batch_size=4, wait_for_server_s=1)  # the infer request's own 404
        assert seconds < 3 and type(exc) is RewardServerNotFound and "HTTP 404 for POST" in str(exc)
    finally:
        server.close()


def test_an_unknown_host():
    exc, seconds = failure("no-such-host.invalid:8000", wait_for_server_s=1)
    assert seconds < 15 and type(exc) is RewardServerUnavailable and exc.reason == "unknown_host"
    assert "unknown host 'no-such-host.invalid'" in str(exc) and "does not resolve" in str(exc)
    assert isinstance(exc.__cause__, socket.gaierror)


def test_a_triton_server_without_the_model():
    ready = Http(triton_without_the_model(ready=True))
    loading = Http(triton_without_the_model(ready=False))
    try:
        exc, seconds = failure(ready.url, wait_for_server_s=1)
        assert seconds < 3 and type(exc) is RewardServerNotFound and exc.reason == "no_model"
        assert "a wrong model_name, or not a reward server" in str(exc) and "unknown model" in str(exc)
        exc, seconds = failure(ready.url, wait_for_server_s=30, model_load_grace_s=0.5)  # past the grace: at once
        assert seconds < 3 and type(exc) is RewardServerNotFound and "HTTP 404 for model 'reward'" in str(exc)
        exc, seconds = failure(loading.url, wait_for_server_s=1)
        assert seconds < 3 and type(exc) is RewardServerUnavailable and exc.reason == "loading"
        assert "still loading its models" in str(exc)
    finally:
        ready.close()
        loading.close()


def test_a_metrics_like_port_raises_the_clients_own_error_at_once():
    server = Http(metrics_like)
    try:
        exc, seconds = failure(server.url)  # reads the config: text, not JSON
        assert seconds < 2 and type(exc) is RewardServerNotFound and exc.reason == "not_triton"
        assert isinstance(exc.__cause__, json.JSONDecodeError)
        assert str(exc).startswith(f"http://{server.url} is not a Triton server: GET /v2/models/reward/config "
                                   f"answered HTTP 200 with '# HELP"), str(exc)
        exc, seconds = failure(server.url, max_batch_size=4)  # infer: HTTP 501
        assert seconds < 2 and type(exc) is RewardServerNotFound and "answered HTTP 501" in str(exc)
    finally:
        server.close()


def test_a_200_that_is_not_a_triton_answer():
    server = Http(lambda h, method: (200, b"<html>welcome</html>", "text/html"))
    try:
        exc, seconds = failure(server.url, max_batch_size=4)
        assert seconds < 2 and type(exc) is RewardServerNotFound and "not a Triton inference answer" in str(exc)
        assert exc.__cause__ is not None
    finally:
        server.close()


def test_a_port_that_does_not_speak_http():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.1)
        stop = threading.Event()

        def serve():  # like a gRPC port: binary frames, then the connection closed
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00garbage\r\n\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            exc, seconds = failure(f"127.0.0.1:{listener.getsockname()[1]}", wait_for_server_s=1)
        finally:
            stop.set()
            thread.join()
    assert seconds < 3 and isinstance(exc, RewardServerError), exc
    assert type(exc) is RewardServerNotFound and "not an HTTP/1.1 answer" in str(exc), exc


# --------------------------------------------------------------------------------------- waited for, ridden through


def test_a_server_started_3s_after_the_first_call_is_waited_for():
    port = closed_port()
    started = {}

    def start_later():
        time.sleep(3)
        started["server"] = Http(good_triton, port)

    threading.Thread(target=start_later, daemon=True).start()
    try:
        begin = time.monotonic()
        with RemoteGPTRMClient(f"127.0.0.1:{port}") as client:  # the defaults
            rewards = client.score(["a", "bb", "ccc", "dddd", "eeeee"], timeout=30)
        seconds = time.monotonic() - begin
    finally:
        while "server" not in started:
            time.sleep(0.1)
        started["server"].close()
    assert rewards[:, 0].tolist() == [1, 2, 3, 4, 5] and 3 <= seconds < 8, seconds


def test_a_server_seen_once_is_ridden_through_past_wait_for_server_s():
    server = Http(good_triton)
    port = server.port
    with RemoteGPTRMClient(server.url, wait_for_server_s=0.5, restart_budget_s=30, retry_backoff_s=0.1,
                           max_backoff_s=0.5) as client:
        assert client.score(["a"]).tolist() == [[1.0]]  # seen
        server.close()  # gone for 2 s, 4 x wait_for_server_s: a restart
        restarted = {}

        def restart():
            time.sleep(2)
            restarted["server"] = Http(good_triton, port)

        threading.Thread(target=restart, daemon=True).start()
        begin = time.monotonic()
        try:
            assert client.score(["a", "bb"], timeout=30).tolist() == [[1.0], [2.0]]
        finally:
            while "server" not in restarted:
                time.sleep(0.1)
            restarted["server"].close()
    assert time.monotonic() - begin >= 1.9


def test_a_pool_with_a_server_never_seen(caplog):
    good = Http(good_triton)
    dead = f"127.0.0.1:{closed_port()}"
    try:
        with caplog.at_level(logging.WARNING, logger="reward_server.client"):
            with RemoteGPTRMClient([dead, good.url], wait_for_server_s=0.5, retry_backoff_s=0.05,
                                   max_backoff_s=0.1) as client:
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:  # every call scored by the good one, none waits for the dead
                    start = time.monotonic()
                    assert client.score(["a", "bb", "ccc", "dddd", "e"]).shape == (5, 1)
                    assert time.monotonic() - start < 1
        warnings = [r.getMessage() for r in caplog.records if dead in r.getMessage()]
        assert len(warnings) == 1 and "has not answered as a reward server" in warnings[0], warnings
        # every server of the pool never seen: wait_for_server_s, then each one's last failure named
        other = f"127.0.0.1:{closed_port()}"
        exc, seconds = failure([dead, other], wait_for_server_s=1)
        assert seconds < 3 and type(exc) is RewardServerUnavailable
        assert f"http://{dead}: cannot connect" in str(exc) and f"http://{other}: cannot connect" in str(exc)
    finally:
        good.close()


# ------------------------------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("client_urls"), []) as srv:
        yield srv


@pytest.mark.server
def test_the_real_servers_metrics_and_grpc_ports(server):
    for kw in ({}, {"max_batch_size": 4}):  # the config read, the infer request
        exc, seconds = failure(f"127.0.0.1:{server.metrics_port}", **kw)
        print(f"metrics port {kw}: {seconds:.2f} s: {exc!r}")
        assert seconds < 5 and type(exc) is RewardServerNotFound and exc.reason == "not_triton", exc
        assert f"http://127.0.0.1:{server.metrics_port} is not a Triton server" in str(exc)
    exc, seconds = failure(f"127.0.0.1:{server.grpc_port}", wait_for_server_s=2)
    print(f"gRPC port: {seconds:.2f} s: {exc!r}")
    assert seconds < 5 and type(exc) is RewardServerNotFound, exc


@pytest.mark.server
def test_the_real_server_answering_3s_after_the_first_call(server):
    port = free_port()
    with RemoteGPTRMClient(server.url) as client:
        expected = client.score(["a", "bb", "ccc"])
    proxy = DelayedProxy(port, server.http_port, delay_s=3)
    try:
        begin = time.monotonic()
        with RemoteGPTRMClient(f"127.0.0.1:{port}") as client:  # the defaults: wait_for_server_s=10
            rewards = client.score(["a", "bb", "ccc"], timeout=30)
        seconds = time.monotonic() - begin
    finally:
        proxy.stop()
    print(f"answered {seconds:.1f} s after the first call")
    assert 3 <= seconds < 10
    np.testing.assert_allclose(rewards, expected, atol=1e-6, rtol=0)
    with RemoteGPTRMClient([f"127.0.0.1:{closed_port()}", server.url]) as client:  # a pool member never seen
        begin = time.monotonic()
        np.testing.assert_allclose(client.score(["a", "bb", "ccc"]), expected, atol=1e-6, rtol=0)
        assert time.monotonic() - begin < 5
