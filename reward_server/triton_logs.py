"""Triton's log, quiet by default: warnings and errors only (server.triton_log_info=true brings back its info
lines: option tables, model loading), PyTriton's own info lines likewise, and without the error-level lines that
Triton prints on every healthy start of ours (BENIGN). Our own log says what loads and ends with one ready line."""

import logging
import re

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
