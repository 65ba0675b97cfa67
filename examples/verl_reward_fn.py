"""A verl custom reward function that scores rollouts on a reward server.

verl config (the reward loop calls `compute_score` once per sample, concurrently; an async function is awaited):

    custom_reward_function:
      path: /path/to/reward-server/examples/verl_reward_fn.py
      name: compute_score          # or compute_score_batch with reward_model.reward_manager=batch

and in the environment of verl's reward workers:

    REWARD_SERVER_URL=http://rm-node0:8000,http://rm-node1:8000   # one or several servers (comma-separated)

Each sample is scored as a conversation, the prompt (`extra_info["question"]`, or `extra_info["prompt"]`: verl's
example datasets keep the question there) as the user turn and `solution_str` as the assistant turn, formatted
with the reward model's chat template on the server. Without a prompt, `solution_str` is sent as text.
Per-sample calls are sent as they come; the server's dynamic batcher merges them into forwards (and computes the
prompt a GRPO group shares once). One RemoteGPTRMClient per process, made on first use.
"""

import asyncio
import os
import threading
from typing import Any, List, Optional

from reward_server.client import RemoteGPTRMClient

_client: Optional[RemoteGPTRMClient] = None
_lock = threading.Lock()


def client() -> RemoteGPTRMClient:
    global _client
    with _lock:
        if _client is None:
            urls = os.environ.get("REWARD_SERVER_URL", "http://localhost:8000").split(",")
            _client = RemoteGPTRMClient([u.strip() for u in urls if u.strip()],
                                        concurrency=int(os.environ.get("REWARD_SERVER_CONCURRENCY", "16")))
        return _client


def as_input(solution_str: str, extra_info: Optional[dict]) -> Any:
    """A conversation (prompt, response) when the sample carries its prompt, else the response as text."""
    prompt = (extra_info or {}).get("question") or (extra_info or {}).get("prompt")
    if isinstance(prompt, str) and prompt:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": solution_str}]
    return solution_str


async def compute_score(data_source: str, solution_str: str, ground_truth: Any = None,
                        extra_info: Optional[dict] = None, **kwargs) -> float:
    """verl's reward-loop signature (extra keyword arguments such as reward_router_address are ignored)."""
    rewards = await client().ainfer_rm([as_input(solution_str, extra_info)])
    return float(rewards[0, 0])


def compute_score_batch(data_sources: List[str], solution_strs: List[str], ground_truths: List[Any],
                        extra_infos: List[Optional[dict]], **kwargs) -> List[float]:
    """verl's batch reward manager signature: one call for the whole batch. A batch mixing conversations and
    plain texts goes as two requests."""
    inputs = [as_input(s, e) for s, e in zip(solution_strs, extra_infos)]
    chats = [i for i, x in enumerate(inputs) if isinstance(x, list)]
    texts = [i for i, x in enumerate(inputs) if not isinstance(x, list)]
    scores: List[float] = [0.0] * len(inputs)
    handles = [(group, client().infer_rm([inputs[i] for i in group])) for group in (chats, texts) if group]
    for group, handle in handles:
        for i, r in zip(group, handle.result()[:, 0].tolist()):
            scores[i] = r
    return scores


if __name__ == "__main__":  # a quick try against a running server
    extra = {"question": "What is 2 + 2?"}
    print(asyncio.run(compute_score("gsm8k", "2 + 2 = 4. The answer is 4.", "4", extra)))
    print(compute_score_batch(["gsm8k"] * 2, ["4", "5"], ["4", "4"], [extra, None]))
