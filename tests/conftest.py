"""Shared pytest set-up: hypothesis profiles (``dev`` fast, ``ci`` thorough)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Two xdist workers on two cores: torch's default of one intra-op thread per core would
# oversubscribe the machine (small ops were measured ~100x slower under load). Subprocess
# clients (megatron ranks, torchrun) set their own.
import torch  # noqa: E402

torch.set_num_threads(1)
