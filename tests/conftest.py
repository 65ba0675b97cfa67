"""Fixtures shared by the test modules (the helpers they use live in tests/servers.py and tests/oracles.py; no test
module imports another), and the `server` marker.

The marker rule: a test that starts a process of ours carries `server`: a server (servers.Server, the start_server
fixture, servers.running_server), any torchrun group, or our programs as subprocesses (serve_reward_model.py,
reward_server.launcher, reward_server.check, benchmarks/*.py). Tests that request start_server get it here,
automatically; every other such test says so in its file: `pytestmark = pytest.mark.server` where all of a
module's tests do, `@pytest.mark.server` on the test otherwise (a module-scoped server fixture marks nothing by
itself: each test using it is marked). It is enforced: while a test without the marker runs, starting any of those
raises (servers.forbid_servers), so a forgotten marker fails that test in every lane, and
`python -m pytest -m "not server"` (the fast lane) starts none.
"""

import pytest

import servers
from oracles import save_family_checkpoints, save_seqcls_checkpoint
from servers import MODELS, Server

AUTO_MARKED = ("start_server",)  # fixtures whose every user starts a server


def pytest_configure(config):
    servers.guard_subprocesses()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in AUTO_MARKED):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test is set up (a module-scoped server included)."""
    servers.forbid_servers(None if item.get_closest_marker("server") else item.nodeid)


def pytest_sessionfinish(session):
    servers.forbid_servers(None)


@pytest.fixture
def start_server(tmp_path):
    """start(nproc, overrides, models, env): a real server, ready; every one started is stopped after the test."""
    started = []

    def start(nproc=2, overrides=(), models=MODELS, env=None):
        srv = Server(nproc, list(overrides) + [f"model.cache_dir={tmp_path / 'cache'}"],
                     tmp_path / f"server{len(started)}.log", env=env)
        started.append(srv)
        return srv.wait_ready(models)

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    return save_seqcls_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory):
    return save_seqcls_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{family: checkpoint} for every family we serve, and "llama-19-labels" (oracles.save_family_checkpoints)."""
    return save_family_checkpoints(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def topo():
    """A process group of one rank (gloo) for in-process engines; torn down with its module."""
    from reward_server import distributed as d
    from reward_server.config import ParallelConfig

    topo = d.init_distributed(ParallelConfig(backend="gloo"))
    yield topo
    d.shutdown()
