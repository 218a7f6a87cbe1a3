"""The shipped adapter's last step: v5 continued on the committed own text (TRAINING.md).

  python -m kangaroo_jax.teacher --mode self --from-ids data/own_text/sharegpt_self_ids.npz \\
      --out runs/teacher/own_text --shards 1000 --batch 8 --shard-size 128 --answer-max 192
  python train.py --config configs/smollm2_135m_own_text.py --config.init_from=<v5's file>

The cache is rebuilt from the token ids in `data/own_text/` by teacher forcing (shard 0,
102 conversations, is held out; 2,623 train). v6 was made from v5:
`git show d35e77b:kangaroo_jax/adapters/smollm2-135m-instruct.safetensors > v5.safetensors`.
Without `--config.init_from` the run continues the adapter shipped now. Two epochs at
batch 8 (656 steps); the learning rate matters most here: 3e-4 stopped gaining at 1,313
conversations, 2e-3 still gains at 2,623.
"""
from configs import smollm2_135m_sharegpt


def get_config():
  c = smollm2_135m_sharegpt.get_config()
  c.data.path = "runs/teacher/own_text"
  c.init_from = "kangaroo_jax/adapters/smollm2-135m-instruct.safetensors"
  c.adapter_ffn = 0
  c.length_buckets = (128, 256)
  c.steps = 656
  c.lr = 2e-3
  c.warmup_steps = 10
  c.eval_every = 328
  c.workdir = "runs/smollm2_135m_own_text"
  return c
