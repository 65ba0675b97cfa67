"""fault_injection.standin: TEST / BENCHMARK ONLY settings of the stand-in scorer (reward_server/faults.py)."""

from dataclasses import dataclass

from .fields import setting




@dataclass
class StandInConfig:
    """TEST / BENCHMARK ONLY (reward_server/faults.py, benchmarks/standin.py): every replica's backbone forward is
    replaced by the time a GPU takes for it (a sleep on a clock of its own, so that rank 0 launches the next forward
    while one runs, as on a GPU) and fixed rewards (a hash of each sequence's tokens up to the token read). The
    layout, the prefix cache's and the replica record's bookkeeping, the leader, Triton and the front doors run for
    real, so the tokens counted computed are the server's. Off by default; the server warns at start-up when on."""

    tokens_per_s: float = setting(
        0.0, "Tokens computed per second by a backbone call that shares nothing (the 8B model on one H100: about "
        "40,000); 0: off.")
    shared_speed: float = setting(
        0.87, "Per-token speed of a call that takes the prefix cache path (it shares a prefix within itself or with the "
        "cache), relative to one that shares nothing (one H100 at 5cf2366: 35,036 / 40,360 computed tokens/s).")
    call_s: float = setting(0.0, "Seconds every backbone call takes on top of its tokens' time.")
