"""Every change we make to PyTriton's behaviour, in one place, for the one PyTriton version we pin.

- install: PyTriton ships proxy_status.py with each model's proxy (the file Triton's Python backend runs) and hooks
  it in: per-request statuses instead of a failed batch with a traceback, patient start-up handshakes, and the
  time each request left Triton's queue (the drain's admission rule). See proxy_status.py.
- quiet: Triton's log at warnings and errors only, without the lines it prints on every healthy start of ours.
- set_log_info: Triton's --log-info, which PyTriton passes on but does not declare.
Each reaches into PyTriton's internals, so `check_version` refuses any other PyTriton than PINNED.
"""

import logging
import pathlib
import re

from . import proxy_status

PINNED = "0.7.0"  # setup.py pins nvidia-pytriton to this version


def check_version() -> None:
    from importlib.metadata import version

    found = version("nvidia-pytriton")
    if found != PINNED:
        raise RuntimeError(f"nvidia-pytriton {found} is installed; reward_server/serving/triton_patches.py patches "
                           f"the internals of {PINNED} (setup.py pins it): pip install nvidia-pytriton=={PINNED}")


_STUB_MODULE = "reward_status"
_HOOK = (f"\n\n# reward-server: per-request statuses and more (reward_server/serving/triton_patches.py, proxy_status.py)\n"
         f"from .{_STUB_MODULE} import guarded as _reward_guarded, stamped as _reward_stamped  # noqa: E402\n"
         f"from .{_STUB_MODULE} import patient as _reward_patient, with_status as _reward_with_status  # noqa: E402\n"
         f"get_config_from_handshake_server = _reward_patient(get_config_from_handshake_server)\n"
         f"_wrap_response = _reward_with_status(_wrap_response)\n"
         f"TritonRequestsServer._wrap_request = _reward_stamped(TritonRequestsServer._wrap_request)\n"
         f"TritonPythonModel.execute = _reward_guarded(TritonPythonModel.execute)\n")


def install() -> None:
    """Make PyTriton ship proxy_status.py with each model's proxy and hook it in, whether the model goes to Triton
    as files in a load request (PyTriton's default) or through a local model store. Once per process."""
    from pytriton.models.model import Model

    check_version()

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


# Error- and warning-level lines Triton prints on a healthy server: no GPU (CPU serving: NVML, DCGM, CUDA driver,
# pinned memory), and models loaded from a load request rather than from a model store (PyTriton's way).
BENIGN = re.compile(r"Failed to initialize NVML|CudaDriverHelper has not been initialized|DCGM unable to start|"
                    r"Unable to allocate pinned system memory|Failed to set config modification time")


def set_log_info(triton, info: bool) -> None:
    """Triton's --log-info, which PyTriton's server config passes on but its TritonConfig does not declare: set it
    on the Triton object before `run()` starts the server."""
    triton._triton_server_config["log_info"] = info


def quiet(info: bool) -> None:
    """Drop BENIGN lines from Triton's output; PyTriton's info lines only with `info`."""
    from pytriton.server.triton_server import TritonServer

    check_version()

    logging.getLogger("pytriton").setLevel(logging.INFO if info else logging.WARNING)
    if getattr(TritonServer, "reward_quiet", False):
        return
    record = TritonServer._record_logs

    def record_logs(self, chunk) -> None:  # chunks as they come (unbuffered): filter whole lines
        pending = getattr(self, "_reward_pending", "") + (
            chunk.decode("utf-8", errors="replace") if isinstance(chunk, bytes) else chunk)
        *lines, self._reward_pending = pending.split("\n")
        for line in lines:
            if not BENIGN.search(line):
                record(self, line + "\n")

    TritonServer._record_logs = record_logs
    TritonServer.reward_quiet = True
