"""Compile time of the train step against depth, with and without layers under nn.scan.

  python benchmarks/compile_time.py [--presets=depth3,depth24] [--batch_size=8] [--seq_len=128]
      [--remat=none]

For each preset and scan setting, builds and compiles the train step exactly as
`trainbig train` and `trainbig plan-memory` do (trainbig_jax.train.memory.compile_train_step:
same model, optimizer, mesh rules and jitted step) on one device, and reports the seconds
from tracing to a compiled executable (lowering and XLA compilation), with nothing cached
(each configuration compiles in a fresh process). A small batch keeps the runs short;
compile time barely depends on it. Wall-clock and CPU seconds of the compiling process are
both reported: on a machine shared with other jobs the CPU seconds are the steadier figure.
The last line is one JSON list for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ONE = '''
import json, sys, time
import jax
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.train import memory
preset, scan, batch, seq_len, remat = sys.argv[1], sys.argv[2] == 'True', int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
c = pretrain_configs.get_config(preset)
c.model.scan_layers, c.model.remat = scan, remat
c.train.batch_size, c.data.seq_len = batch, seq_len
c.mesh.shape = (1, 1, 1)
jax.devices()  # start the runtime outside the timed part
start, cpu_start = time.perf_counter(), time.process_time()
compiled, _, _ = memory.compile_train_step(c, jax.devices()[:1])
print(json.dumps({'preset': preset, 'layers': c.model.num_layers, 'scan_layers': scan,
                  'remat': remat, 'compile_s': time.perf_counter() - start,
                  'compile_cpu_s': time.process_time() - cpu_start}))
'''


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--presets', default='depth3,depth24')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--remat', default='none')
  args = parser.parse_args()
  rows = []
  print('| preset | layers | scan_layers | remat | compile, wall (s) | compile, CPU (s) |\n'
        '| --- | ---: | --- | --- | ---: | ---: |')
  for preset in args.presets.split(','):
    for scan in (False, True):
      out = subprocess.run([sys.executable, '-c', ONE, preset, str(scan), str(args.batch_size),
                            str(args.seq_len), args.remat], capture_output=True, text=True,
                           check=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
      row = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append(row)
      print(f"| {row['preset']} | {row['layers']} | {row['scan_layers']} | {row['remat']} | "
            f"{row['compile_s']:.1f} | {row['compile_cpu_s']:.1f} |", flush=True)
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
