"""AReaL's reward model service URL, `reward_model_service_url`, defaults to http://localhost:30000/classify:
SGLang's native /classify on SGLang's default port, which the reward server's API port serves (server.api_port,
30000 by default). AReaL's code that calls it is not public; this is SGLang's documented request, which the server
answers as SGLang does: one `{"embedding": [raw head outputs], "meta_info": {...}}` per text, `embedding[0]` being
the reward of a 1-label reward model.

    torchrun --nproc_per_node 2 serve_reward_model.py model.path=/ckpt/rm server.host=0.0.0.0
    # AReaL: scheduler.reward_model_service_url=http://rm-host:30000/classify (the default when on the same host)
    python examples/areal_classify.py [http://localhost:30000/classify]
"""

import json
import sys
import urllib.request

URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:30000/classify"


def classify(texts):
    request = urllib.request.Request(URL, data=json.dumps({"model": "reward", "text": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return [item["embedding"][0] for item in json.load(response)]


if __name__ == "__main__":
    print(classify(["Question: What is 2 + 2?\nAnswer: 4", "Question: What is 2 + 2?\nAnswer: 5"]))
