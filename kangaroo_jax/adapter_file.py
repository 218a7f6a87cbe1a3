"""What a path given as an adapter is, when it is not one: the error in the user's words.

Light (no jax), so decode.py can check `--adapter` before its slow imports; `adapter.py`
raises the same messages when a file is loaded in a notebook.
"""
from __future__ import annotations

from typing import Optional

TENSORS = ("input_norm.weight", "attn.qkv", "attn.o", "out_norm.weight")
EXPECTED = (f"expected a safetensors file from train.py holding {', '.join(TENSORS)}, or the "
            "authors' adapter folder")


def not_an_adapter(path: str, what: Optional[str] = None) -> str:
  """'PATH is not a Kangaroo adapter (expected ...)', then what it is, if known."""
  return f"{path} is not a Kangaroo adapter ({EXPECTED})" + (f"; it is {what}" if what else "")


def unreadable(path: str, error: BaseException) -> str:
  """The message for a file safetensors could not open: another kind of file, or a damaged
  adapter (a safetensors file whose header or data is cut short or garbled)."""
  what = file_kind(path)
  if what is not None:
    return not_an_adapter(path, what)
  return f"{path} is corrupt or truncated: {str(error).splitlines()[0]}"


def file_kind(path: str) -> Optional[str]:
  """What a file that is no safetensors file is, from its first bytes; None when it could be
  one (8 bytes of header length, then the JSON header's '{')."""
  with open(path, "rb") as f:
    head = f.read(512)
  if head.startswith(b"GGUF"):
    return "a GGUF model file (pass it as --model)"
  if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
    return "a PyTorch file (for the authors' adapter pass its folder)"
  if head[8:9] == b"{":
    return None
  if not head:
    return "an empty file"
  return "not a safetensors file" if b"\x00" in head else "a text file"
