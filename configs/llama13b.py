"""Vicuna-13B / Llama-2-13B (40 layers), exit layer 3, ShareGPT."""
from configs import llama7b


def get_config():
  c = llama7b.get_config()
  c.exit_layer = 3
  c.workdir = "runs/llama13b"
  c.mesh_model = 2             # shard the 13B parameters over 2 devices per replica
  return c
