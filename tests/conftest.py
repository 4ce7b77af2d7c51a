"""Shared fixtures: tiny site specs and a session-wide data cache in a temp dir."""
import numpy as np
import pytest
import torch

from fedfm.scenarios import site_from_dict

# One intra-op thread: on 2 shared cores two OpenMP threads per process fight each other
# (a small Linear measured 15 ms vs 0.2 ms); Ray actors and the SuperLink run beside pytest.
torch.set_num_threads(1)

SAMPLES = 128  # per generated split in tests: enough for stated statistical tolerances, fast on 2 cores


def tiny_site(name="tiny", environment="uma", **sections) -> "SiteSpec":
    d = {"name": name, "environment": environment, "samples": {"train": 96, "val": 16, "test": 48}, "seed": 7}
    if environment == "inh":
        d["ue"] = {"distance_min_m": 1.0, "distance_max_m": 50.0}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return site_from_dict(d, f"<test:{name}>")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fedfm-cache")


@pytest.fixture(autouse=True)
def fresh_site_caches():
    """Each test starts with the per-process caches of local training empty (fedfm.federated
    keeps the sites' tasks and one model between calls, as a Ray actor does): the in-process
    federations of the tests share one pytest process, and a test's floats should not depend
    on which tests ran before it."""
    import fedfm.federated as fed

    fed._TASKS.clear(), fed._MODEL.clear()
    yield
    fed._TASKS.clear(), fed._MODEL.clear()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
