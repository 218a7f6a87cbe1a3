"""Tests and smoke runs: a few steps at sequence length 64 on a 16-conversation fixture.

The tests point `model_path` at a tiny random model they write; left empty it is the
embedded SmolLM2-135M (`python train.py --config configs/tiny.py` runs in about a minute).
"""
from configs import smollm2_135m


def get_config():
  c = smollm2_135m.get_config()
  c.model_path = ""  # the tests set a tiny random model folder
  c.exit_layer = 1
  c.draft_vocab = 0
  c.data.source = "sharegpt"
  c.data.path = "tests/fixtures/sharegpt_tiny.jsonl"
  c.data.eval_examples = 2
  c.data.magpie_user_starts = ()  # pure Magpie: a random model cannot follow openings
  c.data.magpie_num = 8
  c.data.magpie_batch = 4
  c.data.magpie_user_max = 8
  c.data.magpie_answer_max = 8
  c.data.teacher_top_k = 4
  c.workdir = "runs/tiny"
  c.seq_len = 64
  c.batch_size = 8
  c.steps = 20
  c.lr = 1e-2
  c.warmup_steps = 2
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 5
  c.keep_checkpoints = 2
  return c
