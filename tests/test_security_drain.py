"""Security settings and SIGTERM drain, on one server (torchrun 2 data-parallel ranks): loopback only, Triton's
protected endpoints need the access token (read from a file), inference needs its own token (read from an
environment variable), neither token is logged; model.truncation=left keeps the end of long sequences. The
last test sends SIGTERM while requests are in flight (every forward sleeps 1 s) and checks that they are all
answered, that new ones are refused and that every rank exits cleanly.
"""

import ipaddress
import json
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from pytriton.client import ModelClient

from oracles import reference_rewards
from servers import running_server

pytestmark = pytest.mark.timeout(600)

ADMIN_TOKEN = "admin-" + "x" * 20
INFER_TOKEN = "infer-" + "y" * 20
HEADER = "triton-access-token"
MAX_LEN = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_ckpt):
    tmp = tmp_path_factory.mktemp("security")
    token_file = tmp / "admin_token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    overrides = [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=1",
                 f"server.access_token_file={token_file}", "server.inference_token_env=RS_TEST_INFER_TOKEN",
                 f"model.max_length={MAX_LEN}", "model.truncation=left", "fault_injection.forward_delay_s=1",
                 "batching.max_batch_size=2", "batching.max_queue_delay_us=0", "server.drain_timeout_s=10"]
    env = {"RS_TEST_INFER_TOKEN": INFER_TOKEN, "REWARD_SERVER_ACCESS_TOKEN": ""}
    with running_server(tmp, overrides, env=env) as srv:
        yield srv


def http(url, path, method="GET", token=None, body=None):
    """The HTTP status of a request to Triton."""
    request = urllib.request.Request(url + path, data=body, method=method,
                                     headers={HEADER: token} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def infer(url, seq, token=INFER_TOKEN):
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    try:
        tensor = httpclient.InferInput("token_ids", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[" ".join(map(str, seq)).encode()]], dtype=object))
        result = client.infer("reward", [tensor], headers={HEADER: token} if token else None)
        assert result.as_numpy("error")[0, 0] == b""
        return result.as_numpy("rewards")[0]
    finally:
        client.close()


def listening_addresses(port):
    """Local IPv4 addresses with a listening TCP socket on `port`, from /proc/net/tcp (and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(decode_address(address))
    return found


def decode_address(hex_address):
    """/proc/net/tcp* print an address as 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
    address = ipaddress.ip_address(raw)
    return str(address.ipv4_mapped or address) if address.version == 6 else str(address)


@pytest.mark.server
def test_binds_to_loopback_only(server):
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        assert listening_addresses(port) == {"127.0.0.1"}, port


@pytest.mark.server
def test_protected_endpoints_need_the_access_token(server):
    url = server.url
    assert http(url, "/v2/repository/models/reward/unload", "POST", body=b"{}") == 403
    assert http(url, "/v2/repository/models/reward/unload", "POST", INFER_TOKEN, b"{}") == 403
    assert http(url, "/v2/models/reward/ready") == 200  # still loaded
    for path, method, body in [("/v2/repository/index", "POST", b"{}"), ("/v2/models/stats", "GET", None),
                               ("/v2/logging", "GET", None), ("/v2/trace/setting", "GET", None),
                               ("/v2/systemsharedmemory/status", "GET", None)]:
        assert http(url, path, method, body=body) == 403, path
        assert http(url, path, method, ADMIN_TOKEN, body) == 200, path
    # open: health, readiness, model metadata, Prometheus metrics
    assert http(url, "/v2/health/live") == 200 and http(url, "/v2/health/ready") == 200
    assert http(url, "/v2/models/reward") == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as response:
        assert b"nv_inference_request_success" in response.read()


@pytest.mark.server
def test_inference_needs_the_inference_token(server, llama_ckpt):
    seq = np.arange(4, 4 + 50)  # longer than model.max_length=32: truncation=left keeps the last 32
    expected = reference_rewards(llama_ckpt, [seq[-MAX_LEN:]])[0]
    for token in (None, "wrong", ADMIN_TOKEN):
        with pytest.raises(Exception, match="403|restricted"):
            infer(server.url, seq, token)
    body = json.dumps({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}]})
    assert http(server.url, "/v2/models/reward/infer", "POST", body=body.encode()) == 403
    np.testing.assert_allclose(infer(server.url, seq), expected, atol=1e-4, rtol=0)

    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    tensor = grpcclient.InferInput("token_ids", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[" ".join(map(str, seq)).encode()]], dtype=object))
    with pytest.raises(Exception, match="restricted|PERMISSION|UNAVAILABLE"):
        grpc.infer("reward", [tensor])
    result = grpc.infer("reward", [tensor], headers={f"triton-grpc-protocol-{HEADER}": INFER_TOKEN})
    np.testing.assert_allclose(result.as_numpy("rewards")[0], expected, atol=1e-4, rtol=0)
    grpc.close()

    # NeMo-Aligner's actor uses PyTriton's client: it passes the token the same way
    tokens, lengths = seq[None, -MAX_LEN:], np.array([[MAX_LEN]])
    with ModelClient(server.url, "reward_model", access_token=INFER_TOKEN, inference_timeout_s=60) as client:
        out = client.infer_batch(tokens=tokens, sequence_lengths=lengths)
    np.testing.assert_allclose(out["rewards"][0], expected, atol=1e-4, rtol=0)


@pytest.mark.server
def test_tokens_are_not_logged(server):
    log = server.log()
    assert "ready after" in log
    assert ADMIN_TOKEN not in log and INFER_TOKEN not in log


def raw_infer(url, seq, token=INFER_TOKEN):
    """What a client sees: ("ok", reward), ("http", status, message) or ("conn", error) when the connection failed
    (refused before the request was sent, or lost after it)."""
    import http.client

    body = json.dumps({"inputs": [{"name": "token_ids", "shape": [1, 1], "datatype": "BYTES",
                                   "data": [" ".join(map(str, seq))]}]}).encode()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            return ("refused",)
        try:
            conn.request("POST", "/v2/models/reward/infer", body=body, headers={HEADER: token})
            response = conn.getresponse()
            data = json.loads(response.read())
        except (OSError, http.client.HTTPException) as exc:
            return ("conn", repr(exc))
        if response.status == 200:
            return ("ok", data["outputs"][0]["data"][0])
        return ("http", response.status, data.get("error", ""))
    finally:
        conn.close()


@pytest.mark.server
def test_sigterm_answers_accepted_requests_refuses_new_ones_and_exits_cleanly(server, llama_ckpt):
    seqs = [np.arange(4, 4 + n) for n in (3, 9, 14, 20, 5, 11, 17, 30)]
    expected = reference_rewards(llama_ckpt, seqs)
    load: list = []

    def keep_sending():  # a client that keeps sending through the drain until it is refused
        while time.monotonic() < sigterm + 30:
            sent = time.monotonic()
            load.append((sent, raw_infer(server.url, seqs[0]), time.monotonic()))
            if load[-1][1][0] != "ok":
                return
            time.sleep(0.05)

    with ThreadPoolExecutor(len(seqs) + 2) as pool:
        accepted = [pool.submit(lambda s: (infer(server.url, s), time.monotonic()), s) for s in seqs]
        time.sleep(1.0)  # all sent; 2 per batch, 1 s per forward: about 3 s of work left
        sigterm = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        loaders = [pool.submit(keep_sending) for _ in range(2)]  # clients that keep sending through the drain
        time.sleep(0.5)
        refused = raw_infer(server.url, seqs[0])
        results = [f.result(timeout=60) for f in accepted]
        [f.result(timeout=60) for f in loaders]
    # a request sent after the signal gets 503, or is scored when it takes the place of one that Triton counted
    # as pending (docs/operations.md, Shutdown); never a reset
    assert refused[0] == "ok" or (refused[:2] == ("http", 503) and "shutting down" in refused[2]), refused
    for (reward, _), want in zip(results, expected):
        np.testing.assert_allclose(reward, want, atol=1e-4, rtol=0)
    assert max(t for _, t in results) > sigterm + 1, "nothing was left in flight at SIGTERM"
    kinds = {}
    for sent, result, answered in load:
        kind = result[0] if result[0] != "http" else result[1]
        kinds[kind] = kinds.get(kind, 0) + 1
        assert result[0] in ("ok", "refused") or result[:2] == ("http", 503), (sent - sigterm, result)
        assert answered - sent < 30, result  # none hung
    print(f"load through the drain: {kinds}")
    assert 503 in kinds, kinds
    server.proc.wait(timeout=60)
    print(f"drained and exited {time.monotonic() - sigterm:.1f} s after SIGTERM")
    log = server.log()
    assert "rank 0 exited cleanly" in log and "rank 1 exited cleanly" in log, log[-3000:]
    print(next(line for line in log.splitlines() if line.startswith("drained: ")))
