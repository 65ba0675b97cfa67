"""Several nodes, as docs/operations.md's recipe runs them: one torchrun launcher per node, joined by c10d
rendezvous, tensor parallel inside a node and data parallel across nodes. Here both "nodes" are this machine
(two launchers, `--nnodes 2 --nproc_per_node 2`, world 4 = 2 replicas x TP 2); rewards must equal a plain
transformers forward, as a single-node server's do."""

import numpy as np
import pytest

from oracles import mixed_sequences, reference_rewards
from servers import Server, free_port, score_tokens

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]


def test_two_launchers_over_c10d_rendezvous_serve_as_one(tmp_path, llama_ckpt):
    rendezvous = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                  "--rdzv_id=reward-server-test"]
    overrides = [f"model.path={llama_ckpt}", "parallel.tensor_parallel_size=2", "batching.instances=1",
                 f"model.cache_dir={tmp_path / 'cache'}"]
    http_port = free_port()  # the same settings on every node: the launcher whose rank 0 it is serves
    nodes = [Server(2, overrides, tmp_path / f"node{i}.log", launcher_args=rendezvous, http_port=http_port)
             for i in range(2)]
    try:
        srv = nodes[0].wait_ready()
        seqs = mixed_sequences(16, seed=5, max_len=200)
        np.testing.assert_allclose(score_tokens(srv.url, seqs, per_request=4, clients=2),
                                   reference_rewards(llama_ckpt, seqs), atol=1e-4, rtol=0)
        logs = nodes[0].log() + nodes[1].log()
        assert "tp 2 x dp 2" in logs, logs[-3000:]
        assert sum("ready after" in n.log() for n in nodes) == 1  # one front door
    finally:
        for n in nodes:
            n.stop()
