"""A verl custom reward function that scores each rollout on the reward server's API port with the call verl's own
reward loop makes to its vLLM reward model (POST /classify, `use_activation: false`, reading `data[-1].probs[-1]`),
so a run that used verl's DisRM gets the same numbers from a server it does not launch. verl sends the conversation
rendered with the RM's chat template, its BOS stripped; this sends it as `messages` and the server renders it: the
same tokens (docs/frameworks.md, the text rule).

verl config (the reward loop calls `compute_score` once per sample, concurrently, and awaits it):

    custom_reward_function:
      path: /path/to/reward-server/examples/verl_api_reward_fn.py
      name: compute_score

and in the environment of verl's reward workers: REWARD_SERVER_API=http://rm-node0:30000 (the default).

Each sample goes as a conversation (`messages`): the prompt (`extra_info["question"]` or `extra_info["prompt"]`,
where verl's example datasets keep it) as the user turn and `solution_str` as the assistant turn; the server renders
it with the reward model's chat template, as verl renders it with the RM tokenizer's. Without a prompt,
`solution_str` goes as text (`input`). Retries as verl's worker does: 5xx and connection errors again, up to 8 times,
sleeping min(2^attempt, 30) s; a 4xx raises at once. Only aiohttp (which verl has) is needed.
"""

import asyncio
import os
from typing import Any, Optional

import aiohttp

URL = os.environ.get("REWARD_SERVER_API", "http://localhost:30000").rstrip("/")
ATTEMPTS = 8


def body(solution_str: str, extra_info: Optional[dict]) -> dict:
    prompt = (extra_info or {}).get("question") or (extra_info or {}).get("prompt")
    if isinstance(prompt, str) and prompt:
        return {"model": "reward", "use_activation": False,
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": solution_str}]}
    return {"model": "reward", "use_activation": False, "input": solution_str}


async def compute_score(data_source: str, solution_str: str, ground_truth: Any = None,
                        extra_info: Optional[dict] = None, **kwargs) -> float:
    """verl's reward-loop signature (extra keyword arguments such as reward_router_address are ignored)."""
    for attempt in range(ATTEMPTS):
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
                async with session.post(f"{URL}/classify", json=body(solution_str, extra_info)) as response:
                    if 400 <= response.status < 500:  # our request is wrong: no retry
                        raise ValueError(f"reward server: HTTP {response.status}: {await response.text()}")
                    response.raise_for_status()
                    return float((await response.json())["data"][-1]["probs"][-1])
        except (aiohttp.ClientError, asyncio.TimeoutError):
            if attempt == ATTEMPTS - 1:
                raise
            await asyncio.sleep(min(2 ** attempt, 30))


if __name__ == "__main__":  # a quick try against a running server (the default model's rewards mean nothing)
    extra = {"question": "What is 2 + 2?"}
    print(asyncio.run(compute_score("gsm8k", "2 + 2 = 4. The answer is 4.", "4", extra)))
