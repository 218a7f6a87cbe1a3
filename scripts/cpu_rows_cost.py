"""What the CPU's row design costs plain decoding (`kangaroo_jax.precision`).

Plain decoding of the embedded 135M model (float32, batch 1, greedy, the first turns of
4 Spec-Bench questions, 64 new tokens), in one process, interleaved, under each variant
of the products: one-row layer products and reductions (the design before it: fastest,
but a verification's rows are not computed as plain decoding's), layer products of at
least two rows, reductions over 8-row blocks, and both (the default on a CPU).
Tokens/s of the decoding alone; the first repetition is a warm-up and is not reported.

  python scripts/cpu_rows_cost.py [repetitions]     # measure on a quiet machine
"""
import dataclasses
import json
import sys

import jax.numpy as jnp

from kangaroo_jax.api import encode_prompt, load_model
from kangaroo_jax.bench.questions import DEFAULT_QUESTIONS
from kangaroo_jax.decoding import plain_decode
from kangaroo_jax.precision import products_for

VARIANTS = {"one-row (before)": (1, 1), "products >= 2 rows": (2, 1),
            "reductions over 8 rows": (1, 8), "both (the CPU default)": (2, 8)}


def set_products(model, products) -> None:
  """Every module of `model` that holds products gets `products`."""
  model.products = products
  for layer in model.layers:
    layer.products = layer.attn.products = products


def main(repetitions: int) -> None:
  model, tok = load_model(None)
  with open(DEFAULT_QUESTIONS) as f:
    questions = [json.loads(line) for line in f][:4]
  prompts = [encode_prompt(tok, q["turns"][0]) for q in questions]
  base = products_for(jnp.float32)
  speeds = {name: [] for name in VARIANTS}
  for rep in range(repetitions + 1):
    for name, (min_rows, reduce_rows) in VARIANTS.items():
      set_products(model, dataclasses.replace(base, min_rows=min_rows, reduce_rows=reduce_rows))
      tokens = seconds = 0.0
      for ids in prompts:
        out = plain_decode(model, [ids], max_new_tokens=64)
        tokens += out.stats["decoded_tokens"]
        seconds += out.stats["seconds"]
      if rep:
        speeds[name].append(tokens / seconds)
  first = sum(speeds["one-row (before)"]) / repetitions
  for name, values in speeds.items():
    mean = sum(values) / repetitions
    print(f"{name:24s} {mean:6.1f} tokens/s  {mean / first:5.2f}x  "
          f"({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
