"""slime's remote reward model, pointed at the reward server:

    torchrun --nproc_per_node 2 serve_reward_model.py model.path=/ckpt/rm server.host=0.0.0.0
    python train.py ... --rm-type remote_rm --rm-url http://rm-host:30000/slime/reward
    # slime's --reward-key K: start the server with server.slime_reward_key=K (it then answers {"K": reward})

slime posts one sample per request, `{"prompt", "response", "label"}`, with one shared aiohttp session (64
connections, 120 s total timeout, 10 attempts) and stores the parsed JSON answer as the sample's reward. This script
sends what slime sends, as slime sends it, and prints the answers: a list prompt is scored as a conversation (the
response as the assistant's turn, through the chat template), a string prompt as prompt + response.

    python examples/slime_remote_rm.py [http://localhost:30000/slime/reward]
"""

import asyncio
import sys

import aiohttp

URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:30000/slime/reward"


async def remote_rm(session, sample: dict):
    for attempt in range(10):  # slime: any exception is retried, min(2^attempt, 30) + U(0, 1) s apart
        try:
            async with session.post(URL, json=sample) as response:
                response.raise_for_status()
                return await response.json()
        except Exception:
            if attempt == 9:
                raise
            await asyncio.sleep(min(2 ** attempt, 30))


async def main():
    samples = [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "response": "4", "label": "4"},
               {"prompt": "User: What is 2 + 2?\nAssistant: ", "response": "5", "label": "4"}]
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        print(await asyncio.gather(*(remote_rm(session, s) for s in samples)))


if __name__ == "__main__":
    asyncio.run(main())
