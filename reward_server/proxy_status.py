"""Runs inside Triton's Python backend stub, NOT in the server: reward_server/statuses.py copies this file next
to PyTriton's proxy model (as reward_status.py) and rebinds the proxy's `_wrap_response` to `with_status(...)`.

A response dict that carries STATUS (a Triton error code name, e.g. b"INVALID_ARG") and MESSAGE becomes Triton's
own error response for that one request: its HTTP status / gRPC code follow the code, its text is MESSAGE alone.
Every other response is wrapped by PyTriton as usual. Keep this file free of imports from reward_server.
"""

STATUS = "reward_server_status"
MESSAGE = "reward_server_message"


def with_status(wrap):
    import triton_python_backend_utils as pb_utils  # type: ignore  # exists only inside the stub

    def wrap_response(response, requested_output_names, model_outputs_dict):
        data = response.data
        if data is not None and STATUS in data:
            code = getattr(pb_utils.TritonError, bytes(data[STATUS].reshape(-1)[0]).decode())
            message = bytes(data[MESSAGE].reshape(-1)[0]).decode("utf-8", "replace")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        return wrap(response, requested_output_names, model_outputs_dict)

    return wrap_response
