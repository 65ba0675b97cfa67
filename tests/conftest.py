"""Shared test fixtures: tiny real checkpoints saved with save_pretrained, and a real server started with
torchrun (gloo, CPU) on free ports."""

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port below Linux's ephemeral range: a port the kernel hands out for outgoing connections (gloo,
    clients) may be taken again before the server binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_start = int(f.read().split()[0])
    while True:
        port = random.randrange(20000, min(ephemeral_start, 32768))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def build_tokenizer(vocab_size: int = 512):
    from reward_server.loading.default_model import _train_tokenizer

    return _train_tokenizer(vocab_size)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
WINDOW = 48  # sliding window of the families that have one: shorter than the test sequences, so that it matters


def family_model(arch: str, **common):
    """A tiny random *ForSequenceClassification of one family (the config features that set it apart on)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(**common))
    if arch == "qwen2":  # sliding window on its upper layer only (config.layer_types)
        return tf.Qwen2ForSequenceClassification(tf.Qwen2Config(**common, use_sliding_window=True,
                                                                 sliding_window=WINDOW, max_window_layers=1))
    if arch == "qwen3":  # q/k norms
        return tf.Qwen3ForSequenceClassification(tf.Qwen3Config(**common, head_dim=16))
    if arch == "mistral":  # sliding window on every layer
        return tf.MistralForSequenceClassification(tf.MistralConfig(**common, sliding_window=WINDOW))
    if arch == "gemma2":  # attention logit soft-capping, alternating sliding / full layers, scaled embeddings
        return tf.Gemma2ForSequenceClassification(tf.Gemma2Config(**common, head_dim=16, sliding_window=WINDOW,
                                                                   attn_logit_softcapping=50.0, query_pre_attn_scalar=16))
    if arch == "gemma3":  # q/k norms, local / global layers with their own rotary bases
        return tf.Gemma3TextForSequenceClassification(tf.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16))
    raise ValueError(f"unknown family {arch!r}; expected one of {FAMILIES}")


def save_seqcls_checkpoint(path: Path, arch: str = "llama", num_labels: int = 1, seed: int = 0) -> Path:
    """A tiny random sequence-classification model of the given family plus a real tokenizer."""
    tok = build_tokenizer()
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  num_labels=num_labels, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = family_model(arch, **common)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def reference_rewards(path, seqs):
    """Plain single-process transformers forward, one unpadded sequence at a time."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return np.stack([model(input_ids=torch.as_tensor(s)[None]).logits[0].float().numpy() for s in seqs])


class Server:
    """A real `torchrun --nproc_per_node N serve_reward_model.py ...` process group."""

    def __init__(self, nproc: int, overrides, log_path: Path, env=None, launcher_args=(), http_port=None):
        self.http_port, self.grpc_port, self.metrics_port = http_port or free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *launcher_args, str(REPO / "serve_reward_model.py"),
               f"server.http_port={self.http_port}", f"server.grpc_port={self.grpc_port}",
               f"server.metrics_port={self.metrics_port}", *overrides]
        self._log = open(log_path, "w")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, models=("reward", "reward_model"), timeout=180.0):
        """Ready when every model is: PyTriton loads them one by one and restarts Triton when a later one fails
        to load, so the first model's readiness alone is not the server's."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                if all(urllib.request.urlopen(f"{self.url}/v2/models/{m}/ready", timeout=2).status == 200
                       for m in models):
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()[-5000:]}")

    def terminate(self, timeout=30.0) -> int:
        """SIGTERM to the launcher, as a user's Ctrl-C or a scheduler would; returns torchrun's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise
        self._log.close()
        return self.proc.returncode

    def stop(self, timeout=30.0):
        """Teardown of a server whose shutdown is not under test: SIGKILL to torchrun and its ranks, and rank 0's
        reaper stops Triton (reward_server/lifecycle.py; tests/test_rank_failure.py checks that it does). A graceful
        SIGTERM drain takes ~9 s on 2 cores, mostly Triton unloading its Python backend stubs; tests/test_serve.py
        and tests/test_security_drain.py check that path."""
        self.kill()

    def kill(self):
        if self.proc.poll() is None:
            ranks = children(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def children(pid: int) -> List[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    return out


@pytest.fixture
def start_server(tmp_path):
    servers = []

    def start(nproc=2, overrides=(), models=("reward", "reward_model"), env=None):
        srv = Server(nproc, list(overrides) + [f"model.cache_dir={tmp_path / 'cache'}"],
                     tmp_path / f"server{len(servers)}.log", env=env)
        servers.append(srv)
        return srv.wait_ready(models)

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    return save_seqcls_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory):
    return save_seqcls_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=1)
