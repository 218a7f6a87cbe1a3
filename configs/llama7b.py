"""Vicuna-7B / Llama-2-7B (32 layers), exit layer 2, ShareGPT: the paper's setting.

  python train.py --config configs/llama7b.py --config.model_path=/path/to/vicuna-7b-v1.3 \
      --config.data.path=/path/to/ShareGPT_V4.3_unfiltered_cleaned_split.json
"""
from configs import smollm2_135m
from kangaroo_jax import chat_templates


def get_config():
  c = smollm2_135m.get_config()
  c.model_path = ""  # required: a Hugging Face folder
  c.dtype = "bfloat16"
  c.exit_layer = 2
  c.draft_vocab = 0
  c.data.source = "sharegpt"
  c.data.chat_template = chat_templates.VICUNA  # the one definition decode.py uses too
  c.data.eval_examples = 256
  c.workdir = "runs/llama7b"
  c.seq_len = 2048
  # ShareGPT conversations are 1,270 tokens on average (cut at 2048): batches padded to
  # 512, 1024 or 2048 make the paper's schedule cost 0.73 of padding all to 2048 (TRAINING.md).
  c.length_buckets = (512, 1024)
  c.batch_size = 32           # the paper: 4 per device x 8 devices
  c.steps = 21000             # about 10 epochs of 68k conversations
  c.lr = 5e-5
  c.warmup_steps = 2000
  c.grad_clip = 0.5            # the paper clips gradient values at 0.5; we clip the global norm
  c.checkpoint_every = 1000
  c.eval_every = 1000
  # Every weight split 8 ways over the batch's devices, gathered a layer at a time: the
  # bfloat16 7B (12.6 GiB) fits a v5e chip's 16 GiB with batch 4 a chip beside it.
  c.fsdp = True
  return c
