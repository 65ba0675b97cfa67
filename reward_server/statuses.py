"""One status per request on the wire, never a traceback.

PyTriton 0.7 answers an exception from an infer function by failing every request of the Triton batch with
HTTP 500 / gRPC INTERNAL and a Python traceback as the text. Our infer functions therefore never raise: a request
that fails gets a response dict made by `failure` (an error code and a one-line message), and a few lines added to
PyTriton's proxy model (the file Triton's Python backend runs, see proxy_status.py) turn that dict into Triton's
own error response for that request alone:

  InputError                       INVALID_ARG  HTTP 400, gRPC INVALID_ARGUMENT   the request is wrong; do not retry
  Unavailable (shutting down, ...) UNAVAILABLE  HTTP 503, gRPC UNAVAILABLE        retry later (RemoteGPTRMClient does)
  anything else                    INTERNAL     HTTP 500, gRPC INTERNAL           a server fault; details in the log
"""

import logging
import pathlib

import numpy as np

from . import proxy_status
from .inputs import InputError

log = logging.getLogger(__name__)

# error code names of Triton's Python backend (pb_utils.TritonError.<name>)
INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"
KINDS = {INVALID_ARG: "input", UNAVAILABLE: "unavailable", INTERNAL: "internal"}  # metrics' error kinds
HTTP_STATUS = {INVALID_ARG: 400, UNAVAILABLE: 503, INTERNAL: 500}  # what Triton answers for each (table above)
_STUB_MODULE = "reward_status"
_HOOK = (f"\n\n# reward-server: per-request statuses and more (reward_server/statuses.py, proxy_status.py)\n"
         f"from .{_STUB_MODULE} import guarded as _reward_guarded, stamped as _reward_stamped  # noqa: E402\n"
         f"from .{_STUB_MODULE} import patient as _reward_patient, with_status as _reward_with_status  # noqa: E402\n"
         f"get_config_from_handshake_server = _reward_patient(get_config_from_handshake_server)\n"
         f"_wrap_response = _reward_with_status(_wrap_response)\n"
         f"TritonRequestsServer._wrap_request = _reward_stamped(TritonRequestsServer._wrap_request)\n"
         f"TritonPythonModel.execute = _reward_guarded(TritonPythonModel.execute)\n")


class Unavailable(RuntimeError):
    """The server cannot take this request now (shutting down, overloaded, ranks restarting): retry later."""


def code_of(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return INVALID_ARG
    if isinstance(exc, Unavailable):
        return UNAVAILABLE
    return INTERNAL


def failure(exc: BaseException) -> dict:
    """The response dict of a request that failed with `exc`."""
    message = " ".join(str(exc).split()) or type(exc).__name__  # one line
    return {proxy_status.STATUS: np.array([code_of(exc).encode()], dtype=object),
            proxy_status.MESSAGE: np.array([message.encode()], dtype=object)}


def install() -> None:
    """Make PyTriton ship proxy_status.py with each model's proxy and hook it in, whether the model goes to Triton
    as files in a load request (PyTriton's default) or through a local model store. Once per process."""
    from pytriton.models.model import Model

    if getattr(Model, "reward_statuses", False):
        return
    generate_model, proxy_files = Model.generate_model, Model.get_proxy_model_files
    stub = pathlib.Path(proxy_status.__file__).read_bytes()

    def get_proxy_model_files(self) -> dict:
        files = proxy_files(self)
        files[f"file:{self.model_version}/model.py"] += _HOOK.encode()
        files[f"file:{self.model_version}/{_STUB_MODULE}.py"] = stub
        return files

    def generate_model_with_statuses(self, model_repository: pathlib.Path) -> None:
        generate_model(self, model_repository)
        version = pathlib.Path(model_repository) / self.model_name / str(self.model_version)
        (version / f"{_STUB_MODULE}.py").write_bytes(stub)
        with open(version / "model.py", "a") as f:
            f.write(_HOOK)

    Model.get_proxy_model_files = get_proxy_model_files
    Model.generate_model = generate_model_with_statuses
    Model.reward_statuses = True
