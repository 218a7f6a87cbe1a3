"""Chat templates for tokenizers that have none: one definition for training and decoding.

An adapter learns to draft on text laid out as in its training data, so decoding must
format prompts the same way. Vicuna's tokenizer ships no template; its conversations
(and the paper's ShareGPT training data) use FastChat's Vicuna v1.1 format (`VICUNA`).

`resolve(name_or_file)` gives a template's text: "vicuna", "chatml", a Jinja file, or
template text itself. `for_tokenizer` picks what string prompts go through: the one
asked for, else the tokenizer's own, else Vicuna's for a checkpoint whose folder names
Vicuna; with none of these it is an error saying which flag to pass. No jax: the
command lines check the flag before their slow imports.
"""
from __future__ import annotations

import os
from typing import Optional

# Vicuna v1.1 (FastChat's "vicuna_v1.1" conversation): system prompt, then
# "USER: ... ASSISTANT: ...</s>" turns, the answer's prompt ending in "ASSISTANT:".
VICUNA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif loop.first %}A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. {% endif %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")

# ChatML (<|im_start|>role ... <|im_end|>), as Qwen and SmolLM-style chat models use it.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TEMPLATES = {"vicuna": VICUNA, "chatml": CHATML}
FLAG_HINT = ("pass --chat-template vicuna (Vicuna and other FastChat models), chatml, or a "
             "Jinja file (chat_template= in the API), or --no-chat (chat=False) to send the "
             "prompt as it is")


class ChatTemplateError(ValueError):
  """An unknown template name, an unreadable template file, or no template at all."""


def resolve(template: Optional[str]) -> Optional[str]:
  """The template text of a name in TEMPLATES, a Jinja file, or template text; None stays."""
  if not template:
    return None
  if template in TEMPLATES:
    return TEMPLATES[template]
  if "{{" in template or "{%" in template:
    return template
  if not os.path.isfile(template):
    raise ChatTemplateError(f"unknown chat template {template!r}: use "
                            f"{', '.join(TEMPLATES)} or a Jinja file")
  try:
    with open(template, encoding="utf-8") as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ChatTemplateError(f"cannot read chat template {template}: "
                            f"{getattr(e, 'strerror', None) or e}") from None


def names_vicuna(tokenizer) -> bool:
  """True when the tokenizer was loaded from a folder whose name says Vicuna."""
  path = str(getattr(tokenizer, "name_or_path", "") or "").rstrip("/\\")
  return "vicuna" in os.path.basename(path).lower()


def for_tokenizer(tokenizer, template: Optional[str] = None) -> str:
  """The template text for string prompts to `tokenizer` (see the module docstring)."""
  text = resolve(template) or getattr(tokenizer, "chat_template", None)
  if text:
    return text
  if names_vicuna(tokenizer):
    return VICUNA
  raise ChatTemplateError(f"this model's tokenizer has no chat template: {FLAG_HINT}")
