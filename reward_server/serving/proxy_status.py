"""Runs inside Triton's Python backend stub, NOT in the server: serving/triton_patches.py copies this file next
to PyTriton's proxy model (as reward_status.py) and hooks `with_status` and `guarded` into it.

- with_status: a response dict that carries STATUS (a Triton error code name, e.g. b"INVALID_ARG") and MESSAGE
  becomes Triton's own error response for that one request: its HTTP status / gRPC code follow the code, its
  text is MESSAGE alone, as statuses.failure wrote it (its error token first: protocol.encode_error). Every other
  response is wrapped by PyTriton as usual.
- guarded: the proxy's `execute`, except that a request with an empty input (which PyTriton cannot copy to its
  shared memory) is answered here with INVALID_ARG, and an exception of the proxy itself fails the batch with
  a one-line INTERNAL error (the traceback goes to Triton's log) instead of sending the traceback to clients.
  It also notes when Triton handed the batch over (time.monotonic(), one clock for every process of the host).
- patient: the proxy's `get_config_from_handshake_server`, which each model instance but the first calls at load
  to read its configuration from a socket that the first instance serves. PyTriton gives it 1 s and one try; on
  a loaded machine the socket file appears before its server listens (connection refused) or later than 1 s,
  the model fails to load and Triton has to be started again (seen with 6 instances on 2 cores). This one keeps
  trying for HANDSHAKE_PATIENCE_S.
- stamped: the proxy's `_wrap_request`; it puts that time in each request's parameters as DEQUEUED, so that a
  draining server knows which requests had left Triton's queue before the signal (server.py, RewardService).
Keep this file free of imports from reward_server: the proxy's own errors write their token (protocol.py's
format, `[reward_server:CODE] message`) with `_token`; tests/test_protocol.py checks that the two agree.
"""

STATUS = "reward_server_status"
MESSAGE = "reward_server_message"
HANDSHAKE_PATIENCE_S = 60.0  # how long a model instance waits for the first instance's configuration socket
HANDSHAKE_RETRY_S = 0.02
DEQUEUED = "reward_server_dequeued"  # request parameter: when the stub received the request's batch


def _token(code_name: str, message: str) -> str:
    """protocol.encode_error(code_name, message) for an error of the proxy itself."""
    return f"[reward_server:{code_name}] {message}"


def _error(message: str, code_name: str):
    import triton_python_backend_utils as pb_utils  # type: ignore  # exists only inside the stub

    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code_name)))


def status_of(data):
    """(code name, message) of a failed request's response dict, or None for a scored one."""
    if data is None or STATUS not in data:
        return None
    return bytes(data[STATUS].reshape(-1)[0]).decode(), bytes(data[MESSAGE].reshape(-1)[0]).decode("utf-8", "replace")


def with_status(wrap):
    def wrap_response(response, requested_output_names, model_outputs_dict):
        failed = status_of(response.data)
        if failed is not None:
            return _error(failed[1], failed[0])
        return wrap(response, requested_output_names, model_outputs_dict)

    return wrap_response


def _empty_input(request):
    for tensor in request.inputs():
        shape = list(tensor.shape())
        if 0 in shape:
            return f"input {tensor.name()!r} has no elements (shape {shape})"
    return None


def guarded(execute):
    def guarded_execute(self, requests):
        import time
        import traceback

        import triton_python_backend_utils as pb_utils  # type: ignore

        try:
            self._requests_server.reward_dequeued = time.monotonic()  # one batch at a time per instance
            refused = {i: why for i, why in ((i, _empty_input(r)) for i, r in enumerate(requests)) if why}
            rest = [r for i, r in enumerate(requests) if i not in refused]
            answers = iter(execute(self, rest) if rest else [])
            return [_error(_token("INVALID_ARG", refused[i]), "INVALID_ARG") if i in refused else next(answers)
                    for i in range(len(requests))]
        except Exception:
            pb_utils.Logger.log_error(f"reward-server proxy: a batch failed: {traceback.format_exc()}")
            failed = _token("INTERNAL", "the server failed this batch (see its log); retry")
            return [_error(failed, "INTERNAL") for _ in requests]

    return guarded_execute


def stamped(wrap_request):
    def stamped_wrap_request(self, triton_request, inputs, span=None):
        request = wrap_request(self, triton_request, inputs, span)
        request.parameters = {**(request.parameters or {}), DEQUEUED: getattr(self, "reward_dequeued", None)}
        return request

    return stamped_wrap_request


def patient(get_config):
    def patient_get_config(socket_path, *args, **kwargs):
        import time

        deadline = time.monotonic() + HANDSHAKE_PATIENCE_S
        while True:
            try:
                return get_config(socket_path, *args, **kwargs)
            except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(HANDSHAKE_RETRY_S)

    return patient_get_config
