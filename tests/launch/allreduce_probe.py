"""A stand-in binary for the launch scripts: joins jax.distributed, then all-reduces.

    launch/local.sh --num_processes=2 --binary=tests.launch.allreduce_probe
    launch/gpu_multinode.sh --python=python3 --binary=tests.launch.allreduce_probe

Takes the flags the scripts pass to experiments/train.py (--coordinator_address,
--num_processes, --process_id). Every device contributes its process index + 1; the sum
over all devices must be Σ_p (p + 1) · devices_of(p), counted from jax.devices(). Prints
one line per process and exits non-zero on a wrong sum. Needs only jax (so it runs on a
machine without attn_jax's other dependencies).
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  args, _ = parser.parse_known_args(argv)
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes, process_id=args.process_id)
  mesh = jax.make_mesh((jax.device_count(),), ("all",))
  local = np.full((jax.local_device_count(),), jax.process_index() + 1, np.float32)
  values = multihost_utils.host_local_array_to_global_array(
      local, mesh, jax.sharding.PartitionSpec("all"))
  # One collective only: a second one (process_allgather, two 2-device cliques) hung about
  # once in 30 runs of a loaded 2-core machine in jaxlib 0.11.2's gloo connect, its
  # other device still connecting at exit.
  total = float(jax.block_until_ready(jax.jit(jnp.sum, out_shardings=jax.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))(values)))
  expected = float(sum(device.process_index + 1 for device in jax.devices()))
  print(f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} "
        f"{jax.devices()[0].platform} devices, sum {total:g} (expected {expected:g})",
        flush=True)
  jax.distributed.shutdown()
  return 0 if total == expected else 1


if __name__ == "__main__":
  sys.exit(main())
