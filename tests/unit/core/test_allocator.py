"""``retain_freed_memory``: CAFM steps stop faulting their memory in anew."""

import json
import platform
import subprocess
import sys

import pytest

from cafm_core.allocator import retain_freed_memory

# Page faults per CAFM cycle (4 D steps and a G step) of the tiny DiT (batch 128), counted after
# warm-up cycles, in a fresh process with the default allocator settings and with retain_freed_memory.
PROBE = """
import json, resource, sys, torch
from cafm_core.allocator import retain_freed_memory
from cafm_core.models import build_generator, discriminator_from_generator, dit_config
from cafm_core.logits import DiscriminatorLogits
from cafm_core.training import CAFMConfig, adam, discriminator_step, generator_step
retained = retain_freed_memory() if sys.argv[1] == "retain" else None
torch.manual_seed(0)
torch.set_num_threads(1)
generator = build_generator(dit_config("tiny", num_classes=10))
with torch.no_grad():
    for p in generator.parameters():
        p.add_(0.02 * torch.randn_like(p))
discriminator = discriminator_from_generator(generator)
g_optimizer = adam(generator.parameters(), 1e-6, (0.0, 0.95))
d_optimizer = adam(discriminator.parameters(), 1e-6, (0.0, 0.95))
logits = DiscriminatorLogits(discriminator)
batch = (torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,)))
def step():  # a CAFM cycle: N = 4 D steps, one G step
    for _ in range(4):
        discriminator_step(generator, logits, d_optimizer, batch, CAFMConfig())
    generator_step(generator, discriminator, g_optimizer, batch, CAFMConfig())
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"retained": retained, "faults_per_cycle": faults}))
"""


def _probe(*modes: str) -> list[dict]:
    """Run the probe once per mode, the processes side by side (each uses one thread)."""
    runs = [subprocess.Popen([sys.executable, "-c", PROBE, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for mode in modes]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_cafm_steps_keep_their_memory_between_steps():
    default, retained = _probe("default", "retain")
    assert retained["retained"] is True
    # default glibc: tens of thousands of pages (150-250 MiB) faulted in again every cycle
    # (39,000-63,000 in ten probes here); retained: 0-1,400 after the same warm-up
    assert default["faults_per_cycle"] > 1000, default
    assert retained["faults_per_cycle"] < 0.2 * default["faults_per_cycle"], (default, retained)


def test_trim_threshold_is_checked():
    with pytest.raises(ValueError, match="trim_threshold"):
        retain_freed_memory(trim_threshold=1024)
    with pytest.raises(ValueError, match="trim_threshold"):
        retain_freed_memory(trim_threshold=2**31)
