"""Rank 0's front doors (Triton, OpenRLHF) over one service, and what keeps them honest: input checks, the drain,
metrics, the watchdog, the Triton process group."""
