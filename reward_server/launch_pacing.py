"""When rank 0 launches the next forward while one is still running on the GPU (batching.overlap).

Without pacing, rank 0 launches forward N+1 as soon as it has answered forward N-1, with the requests queued at that
moment. The clients N-1 just answered have not sent their next requests yet, so those wait for N+2. Under a closed
loop of C clients whose forwards the token budget does not fill (a tree search's short steps on cached prefixes),
each forward then holds about C/3 requests, and each request waits about three forwards.

With pacing, rank 0 keeps taking requests while N runs, until N is expected to end in `lead` times the time a launch
takes (both measured on recent forwards). The answered clients' next requests then go into N+1: forwards hold
about C/2 requests, and each waits about two. The GPU is never meant to wait: a forward that the queued work fills
is launched at once, as is any forward while nothing has been measured yet (the first forwards, the CPU).
"""

from typing import Optional

# Weight of the newest measurement in the running estimates (exponential smoothing).
SMOOTHING = 0.25


class Pacer:
    def __init__(self, lead: float):
        self.lead = lead  # batching.launch_lead; 0: no pacing
        self.seconds_per_token: Optional[float] = None  # the GPU's time per token computed, smoothed
        self.launch_s: Optional[float] = None  # rank 0's time to plan and launch a forward, smoothed

    @staticmethod
    def _smooth(old: Optional[float], new: float) -> float:
        return new if old is None else old + SMOOTHING * (new - old)

    def launched(self, seconds: float) -> None:
        """Rank 0 took `seconds` to plan a forward and launch it."""
        self.launch_s = self._smooth(self.launch_s, seconds)

    def finished(self, gpu_seconds: float, computed: int) -> None:
        """A forward of `computed` tokens took `gpu_seconds` on the GPU (its first kernel to its rewards on the host)."""
        if computed > 0 and gpu_seconds > 0:
            self.seconds_per_token = self._smooth(self.seconds_per_token, gpu_seconds / computed)

    def deadline(self, started: float, computed: int) -> Optional[float]:
        """time.monotonic() by which to launch the next forward, while a forward of `computed` tokens that began on
        the GPU at `started` runs; None: launch at once (pacing off, or nothing measured yet)."""
        if not self.lead or self.seconds_per_token is None or self.launch_s is None:
            return None
        return started + self.seconds_per_token * computed - self.lead * self.launch_s
