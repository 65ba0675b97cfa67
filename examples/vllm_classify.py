"""A script written against vLLM's pooling API, pointed at the reward server's API port (vLLM serves on 8000; the
reward server's Triton has that port, its API port is 30000). As vLLM's classify example does: the model's id from
GET /v1/models, then POST /classify. `use_activation: false` gives the head's raw outputs (what verl reads), the
default vLLM's activation (a sigmoid for a 1-label model). Against a process reward model (reward=math_shepherd ...),
POST /pooling with task "token_classify" gives each step's columns (docs/frameworks.md).

    python examples/vllm_classify.py [http://localhost:30000]
"""

import json
import sys
import urllib.request

BASE = (sys.argv[1] if len(sys.argv) > 1 else "http://localhost:30000").rstrip("/")


def call(path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(BASE + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


if __name__ == "__main__":
    model = call("/v1/models")["data"][0]["id"]
    prompts = ["Hello, my name is", "The capital of France is Paris."]
    for use_activation in (None, False):
        answer = call("/classify", {"model": model, "input": prompts, "use_activation": use_activation})
        print(f"use_activation={use_activation}:", [d["probs"] for d in answer["data"]])
    chat = call("/classify", {"model": model, "messages": [{"role": "user", "content": "What is 2 + 2?"},
                                                             {"role": "assistant", "content": "4"}]})
    print("messages:", chat["data"][0]["probs"])
