"""Which queries does the width-64 Zoology attention (plateau at 0.49) get right?

    ./dev.sh python docs/results/scripts/2026-12-07-zoology_plateau_by_pair.py \\
        DIR/runs/softmax-t64-kv4-d64-lr3.0e-03

DIR: the output folder of the zoology_figure2_cpu grid (docs/results/zoology.md).
"""
import sys
import numpy as np, jax, jax.numpy as jnp
import attn_jax
from attn_jax.data.mqar import mqar_examples
model = attn_jax.load(sys.argv[1])
ex = mqar_examples(1000, vocab_size=128, seq_len=64, num_kv_pairs=4, power_a=0.01,
                   rng=np.random.default_rng(7), random_non_queries=False)
logits = np.asarray(jax.jit(lambda t: model(t))(jnp.asarray(ex["inputs"])))
pred = logits.argmax(-1)
m = ex["loss_mask"] > 0
inputs, targets = ex["inputs"], ex["targets"]
keys = inputs[:, 0:8:2]
by_pair, by_order = np.zeros(4), np.zeros(4)
cnt_pair, cnt_order = np.zeros(4), np.zeros(4)
for r in range(1000):
  qpos = np.nonzero(m[r])[0]
  for order, p in enumerate(qpos):
    pair = int(np.nonzero(keys[r] == inputs[r, p])[0][0])
    ok = pred[r, p] == targets[r, p]
    by_pair[pair] += ok; cnt_pair[pair] += 1
    by_order[order] += ok; cnt_order[order] += 1
print("accuracy by pair index (k_1..k_4):", np.round(by_pair / cnt_pair, 3))
print("accuracy by query order in the row:", np.round(by_order / cnt_order, 3))
