"""A tiny random model for tests: `model_path` points at a folder the test writes."""
from configs import smollm2_135m


def get_config():
  c = smollm2_135m.get_config()
  c.model_path = ""  # set by the test (a tiny HF folder)
  c.exit_layer = 1
  c.draft_vocab = 0
  c.data.source = "sharegpt"
  c.data.eval_examples = 2
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
