"""Per-request cost of RemoteGPTRMClient over a bare tritonclient.http call, against a running server.

    torchrun --nproc_per_node 2 serve_reward_model.py &          # the default server
    python benchmarks/client_overhead.py --url localhost:8000

Both sides score the same token-id sequences as one request (batch <= the server's max batch size), one
request at a time, alternating bare / client call by call so that load changes on the machine hit both alike.
"bare" is what an actor would write by hand: encode the ids, build the InferInput, infer, read the outputs.
"client" is `client.infer_rm(seqs).result()` (encoding, worker-thread hand-off, error checks, reassembly).
"handle" is how long `infer_rm` takes to return its handle (the time the actor is blocked).
"""

import argparse
import statistics
import time

import numpy as np
import tritonclient.http as httpclient

from reward_server.client import RemoteGPTRMClient


def bare_call(client: httpclient.InferenceServerClient, model: str, seqs) -> np.ndarray:
    rows = np.array([[" ".join(map(str, s.tolist())).encode()] for s in seqs], dtype=object)
    tensor = httpclient.InferInput("token_ids", list(rows.shape), "BYTES")
    tensor.set_data_from_numpy(rows)
    result = client.infer(model, [tensor])
    assert not any(result.as_numpy("error").reshape(-1))
    return result.as_numpy("rewards")


def ms(values):
    return f"{statistics.median(values) * 1e3:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8000")
    parser.add_argument("--model", default="reward")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    bare = httpclient.InferenceServerClient(args.url.removeprefix("http://"), network_timeout=600)
    print(f"{args.iters} calls each, sequences of {args.length} tokens, median ms per request")
    print("| batch | bare tritonclient | RemoteGPTRMClient | overhead (median of paired differences) "
          "| infer_rm returns in |")
    print("|---|---|---|---|---|")
    with RemoteGPTRMClient(args.url, args.model) as client:
        for batch in args.batch_sizes:
            seqs = [rng.integers(4, args.vocab, args.length) for _ in range(batch)]
            np.testing.assert_allclose(client.infer_rm(seqs).result(), bare_call(bare, args.model, seqs), atol=1e-5)
            t_bare, t_client, t_handle = [], [], []
            for i in range(args.warmup + args.iters):
                start = time.perf_counter()
                bare_call(bare, args.model, seqs)
                middle = time.perf_counter()
                handle = client.infer_rm(seqs)
                returned = time.perf_counter()
                handle.result()
                end = time.perf_counter()
                if i >= args.warmup:
                    t_bare.append(middle - start)
                    t_client.append(end - middle)
                    t_handle.append(returned - middle)
            diffs = [c - b for b, c in zip(t_bare, t_client)]
            print(f"| {batch} | {ms(t_bare)} | {ms(t_client)} | {ms(diffs)} | {ms(t_handle)} |")
    bare.close()


if __name__ == "__main__":
    main()
