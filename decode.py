"""Decode a prompt with Kangaroo self-speculative decoding (or plain decoding), or chat.

  python decode.py --prompt "Why is the sky blue?"
  python decode.py --prompt "What is 2+2?" --max-new-tokens 24 --compare --json
  python decode.py --prompt-file question.txt        # or: cat question.txt | decode.py --prompt -
  python decode.py --chat                             # interactive; the model stays loaded

The answer streams to stdout; timing statistics go to stderr. With --json, stdout gets
one JSON object instead (nothing is streamed). Bad input ends with one line
`error: <message>` on stderr and exit status 2; Ctrl-C with one line and status 130; a
closed stdout (e.g. `| head -2`) quietly with status 141.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

STARTED = time.perf_counter()  # time to first token is measured from here

try:
  from kangaroo_jax import cli  # noqa: E402  light (no jax): the shared command-line helpers
except ImportError as e:  # an installed jax and flax that do not work together (versions.py)
  print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
  sys.exit(2)

# Before jax/transformers are imported: their logs would mix with the stats on stderr.
cli.set_offline_quiet_environment()

ADAPTER_FORMAT = "kangaroo-jax-adapter/1"  # kangaroo_jax.adapter._FORMAT (importing it loads jax)
ADAPTER_TENSORS = ("input_norm.weight", "attn.qkv", "attn.o", "out_norm.weight")


class CliError(ValueError):
  """Bad command-line input; a ValueError so that main() reports it like library errors."""


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags (errors raise CliError instead of printing usage)."""
  p = cli.OneLineParser(description=__doc__.split("\n")[0], error_type=CliError)
  add = p.add_argument
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="the user message; '-' reads it from stdin")
  source.add_argument("--prompt-file", metavar="PATH", help="read the user message from a file")
  source.add_argument("--chat", action="store_true", help="interactive chat: one message per "
                      "stdin line; keeps the model, the compiled loop and the conversation "
                      "(/reset clears it, /exit or end of input ends); stats per answer on stderr")
  add("--model", metavar="PATH",
      help="Hugging Face folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
  add("--dtype", choices=["float32", "bfloat16"],
      help="weights dtype (default: float32 on a CPU, bfloat16 on accelerators); the KV "
      "cache follows --activations")
  add("--activations", choices=["float32", "bfloat16"],
      help="hidden-state dtype (default: float32 on a CPU, bfloat16 on accelerators): "
      "float32 keeps greedy Kangaroo token-identical to plain decoding with single-row "
      "steps (a CPU's); bfloat16 is cheaper on accelerators, and identical there by "
      "fixed-width steps (on a CPU only with --step-width 8)")
  add("--step-width", type=int, metavar="W",
      help="rows per sequence of every decoding step: W > 1 runs plain steps and "
      "verification over W rows, identical by construction (at most W - 1 drafts a round); "
      "default 1 on a CPU (cheaper there), 8 on accelerators (free there)")
  add("--mesh", metavar="DATAxMODEL", type=parse_mesh,
      help="shard over a ('data', 'model') device mesh, e.g. 1x8: batch over DATA devices, "
      "weights over MODEL (default: on several accelerators, the smallest MODEL that fits the "
      "weights; on CPUs one device)")
  add("--max-new-tokens", type=int, default=256, metavar="N")
  add("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  add("--top-p", type=float, default=1.0)
  add("--top-k", type=int, default=0, help="0 = no top-k cut (default)")
  add("--seed", type=int, default=0, help="sampling seed")
  add("--repetition-penalty", type=float, default=1.0, metavar="R",
      help="transformers' repetition_penalty: logits of tokens already in the prompt or answer "
      "are divided by R (multiplied when negative); 1.0 = none (default), 1.1-1.3 curbs loops")
  add("--mode", choices=["kangaroo", "plain"], default="kangaroo")
  add("--adapter", metavar="PATH", help="adapter file (ours, from train.py), or the folder the "
      "paper's authors publish (config.json + pytorch_model.bin; needs torch) (default: the "
      "shipped one if it fits the model)")
  add("--untrained-adapter", action="store_true",
      help="Kangaroo with a freshly initialised adapter for a model that has none (still "
      "lossless, but slower than --mode plain: for trying the code path, not for speed)")
  add("--exit-layer", type=int, metavar="L",
      help="layers before the adapter: the authors' folder does not store it (default 2); "
      "must match an adapter file's")
  add("--threshold", type=float, metavar="ETA",
      help="stop drafting when the draft's top-1 probability < ETA (default: the tuned "
      "setting for this backend, else 0.6)")
  add("--max-draft", type=int, metavar="GAMMA",
      help="draft tokens per round at most (default: the tuned setting, else 6)")
  add("--send-unconfident", choices=("yes", "no"), default=None,
      help="verify the draft that fell below ETA too, as the paper does (default: the tuned "
      "setting, else yes); 'no' pays where verifying one more position is costly (CPUs)")
  add("--tree-nodes", type=int, metavar="N", help="tree drafting (greedy only): verify the N "
      "most probable nodes of a draft tree, MAX_DRAFT deep; 0 = a chain (default: the tuned "
      "setting, else 0)")
  add("--tree-topk", type=int, metavar="K", help="tree drafting: children per node and nodes "
      "expanded per depth (default: the tuned setting, else 4)")
  add("--lookup", type=int, metavar="N", help="prompt-lookup drafting: when the last 3 tokens "
      "occurred earlier in the text, verify up to N tokens that followed there instead of "
      "adapter drafts; 0 = off (default: the tuned setting, else 0)")
  add("--draft-vocab", type=int, metavar="N", help="draft over the N most frequent ids of the "
      "adapter's stored draft vocabulary; 0 = full vocabulary (default: all it stores, if any)")
  add("--compare", action="store_true", help="also decode plainly; report the speedup and "
      "whether the outputs are token-identical (expected when greedy; sampling is lossless in "
      "distribution only). Each mode is warmed up before timing; nothing is streamed")
  add("--json", action="store_true", help="print one JSON object to stdout, nothing streamed")
  add("--no-chat", action="store_true", help="do not apply the chat template")
  add("--chat-template", metavar="vicuna|chatml|FILE",
      help="the prompt format when the tokenizer has none (or to replace its own): vicuna "
      "(Vicuna v1.1, as the paper's adapters were trained), chatml, or a Jinja file "
      "(default: the tokenizer's own; vicuna for a model folder named vicuna)")
  add("--no-compile-cache", action="store_true", help="do not use JAX's persistent compilation "
      "cache (default: on, in $KANGAROO_JAX_CACHE/xla, else ~/.cache/kangaroo_jax/xla; "
      "KANGAROO_JAX_NO_COMPILE_CACHE=1 also turns it off)")
  return p


def parse_mesh(text: str) -> tuple[int, int]:
  """'2x4' -> (2, 4): the --mesh value."""
  data, sep, model = text.partition("x")
  if not (sep and data.isdigit() and model.isdigit() and int(data) >= 1 and int(model) >= 1):
    raise argparse.ArgumentTypeError(f"--mesh must be DATAxMODEL with positive integers "
                                     f"(e.g. 1x8), got {text!r}")
  return int(data), int(model)


def utf8_text(data, source: str) -> str:
  """`data` (bytes, or text that may hold undecodable bytes) as text; CliError unless UTF-8.

  Python hands undecodable bytes of argv (and of stdin under a C locale or in UTF-8
  mode) over as lone surrogates, which the tokenizer rejects with a TypeError; they are
  turned back into bytes here so that the error names the first bad byte.
  """
  if isinstance(data, str):
    try:
      data = data.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoder made: still not UTF-8 text
      data = data.encode("utf-8", "surrogatepass")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CliError(f"{source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                   f"{e.start})") from None


def stdin_bytes():
  """Where to read stdin's raw bytes (its binary buffer; the stream itself if it has none)."""
  return getattr(sys.stdin, "buffer", sys.stdin)


def read_prompt(args: argparse.Namespace) -> None:
  """Fills args.prompt from --prompt-file or stdin (--prompt -); trailing newlines dropped."""
  if args.prompt_file is not None:
    try:
      with open(args.prompt_file, encoding="utf-8") as f:
        args.prompt = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise CliError(f"cannot read --prompt-file {args.prompt_file}: "
                     f"{getattr(e, 'strerror', None) or e}") from None
  elif args.prompt == "-":
    args.prompt = utf8_text(stdin_bytes().read(), "stdin")
  elif args.prompt is not None:
    args.prompt = utf8_text(args.prompt, "--prompt")
  if args.prompt is not None:
    args.prompt = args.prompt.rstrip("\r\n")


def check_adapter_file(path: str, exit_layer) -> None:
  """Reads only the adapter file's header (or the folder's config), so a bad adapter fails
  before the slow model load."""
  import safetensors  # light: no jax

  from kangaroo_jax import adapter_file, authors_adapter  # light: no jax yet
  if authors_adapter.is_folder(path):
    return authors_adapter.check_folder(path)
  if path.endswith((".bin", ".pt", ".pth")):
    raise CliError(f"{path} is a PyTorch file, not a kangaroo-jax adapter; for the authors' "
                   "adapter pass its folder (config.json + pytorch_model.bin)")
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      meta, names = f.metadata() or {}, set(f.keys())
  except Exception as e:  # safetensors raises several types for damaged files
    raise CliError(adapter_file.unreadable(path, e)) from None
  if meta.get("format") != ADAPTER_FORMAT:
    model = any(n.startswith(("model.", "lm_head.")) for n in names)
    raise CliError(adapter_file.not_an_adapter(path, "a model's weights (pass its folder as "
                                               "--model)" if model else "another safetensors file"))
  try:
    trained = json.loads(meta["config"])["exit_layer"]
  except (KeyError, TypeError, ValueError):
    raise CliError(f"{path} is corrupt or truncated: no adapter config in its metadata") from None
  missing = [t for t in ADAPTER_TENSORS if t not in names]
  if missing:
    raise CliError(f"{path} lacks the tensor {missing[0]!r}")
  if exit_layer is not None and trained != exit_layer:
    raise CliError(f"the adapter was trained for exit layer {trained}, not {exit_layer}")


def validate(args: argparse.Namespace) -> None:
  """Checks what needs no model, so that mistakes fail before the slow load."""
  read_prompt(args)
  checks = [
      (args.chat or args.prompt.strip() != "", "empty prompt"),
      (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
      (args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}"),
      (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
      (args.top_k >= 0, f"--top-k must be >= 0, got {args.top_k}"),
      (args.threshold is None or 0 < args.threshold <= 1,
       f"--threshold must be in (0, 1], got {args.threshold}"),
      (args.max_draft is None or args.max_draft >= 1,
       f"--max-draft must be >= 1, got {args.max_draft}"),
      (not (args.tree_nodes and args.temperature > 0),
       "tree drafting is greedy only: use --temperature 0 or --tree-nodes 0"),
      (args.exit_layer is None or args.exit_layer >= 1,
       f"--exit-layer must be >= 1, got {args.exit_layer}"),
      (args.draft_vocab is None or args.draft_vocab >= 0,
       f"--draft-vocab must be >= 0, got {args.draft_vocab}"),
      (args.step_width is None or args.step_width >= 1,
       f"--step-width must be >= 1, got {args.step_width}"),
      (args.repetition_penalty > 0,
       f"--repetition-penalty must be > 0, got {args.repetition_penalty}"),
      (not (args.compare and args.mode == "plain"), "--compare needs --mode kangaroo"),
      (not (args.chat and (args.compare or args.json)), "--chat cannot be combined with "
       "--compare or --json"),
      (args.adapter is None or os.path.exists(args.adapter),
       f"no such adapter file: {args.adapter}"),
      (not (args.adapter and args.untrained_adapter),
       "--untrained-adapter and --adapter exclude each other"),
  ] + cli.tree_flag_checks(args)
  for ok, message in checks:
    if not ok:
      raise CliError(message)
  if args.adapter is not None and args.mode == "kangaroo":
    check_adapter_file(args.adapter, args.exit_layer)
  from kangaroo_jax import chat_templates  # light: no jax
  args.chat_template = chat_templates.resolve(args.chat_template)  # its text, checked now
  if args.adapter is None and args.mode == "kangaroo" and not args.untrained_adapter:
    check_model_has_adapter(args.model, args.exit_layer)


def check_model_has_adapter(model, exit_layer) -> None:
  """Fails before the slow load when a Hugging Face folder's model cannot use the shipped
  adapter (its hidden size differs) and no adapter was given (`api.NO_ADAPTER`); other
  cases (a .gguf file) are decided after loading, by `api.load_adapter_for`."""
  config = os.path.join(model or "", "config.json")
  if model is None or not os.path.isfile(config):
    return
  import safetensors  # light: no jax
  shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kangaroo_jax", "adapters",
                         "smollm2-135m-instruct.safetensors")
  from kangaroo_jax.config import ModelConfig  # light: no jax
  try:
    with open(config) as f:
      hidden = ModelConfig.from_hf_dict(json.load(f)).hidden_size
    with safetensors.safe_open(shipped, framework="numpy") as f:
      fits = json.loads(f.metadata()["config"])["hidden_size"] == hidden
  except (OSError, ValueError, KeyError, TypeError):
    return  # the loader reports a config it cannot run; load_adapter_for the rest
  if not fits or exit_layer is not None:
    from kangaroo_jax.authors_adapter import NO_ADAPTER  # light: no jax
    raise CliError(NO_ADAPTER)


def decode_kwargs(args, adapter, draft_ids, mode: str) -> dict:
  """The keyword arguments of `api.generate`/`api.stream` for these flags."""
  return dict(mode=mode, adapter=adapter, draft_ids=draft_ids,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
              seed=args.seed, eta=args.threshold,
              gamma=args.max_draft, chat=not args.no_chat, chat_template=args.chat_template,
              send_unconfident=(None if args.send_unconfident is None
                                else args.send_unconfident == "yes"),
              tree_nodes=args.tree_nodes, tree_topk=args.tree_topk, lookup=args.lookup)


def run_stream(api, model, tokenizer, prompt, kwargs, show: bool, since: float):
  """Streams one decode, printing the pieces if `show`; returns (Generation, stats).

  stats["time_to_first_token_seconds"] counts from `since` (a perf_counter time: the
  process start, or when a chat message was read) to the first piece.
  """
  pieces = api.stream(model, tokenizer, prompt, **kwargs)
  first, shown = None, ""
  while True:
    try:
      piece = next(pieces)
    except StopIteration as stop:
      gen = stop.value
      break
    if first is None:
      first = time.perf_counter() - since
    shown += piece
    if show:
      sys.stdout.write(piece)
      sys.stdout.flush()
  if show and gen.text.startswith(shown):
    # `stream` holds back a trailing incomplete character; the final text has it.
    sys.stdout.write(gen.text[len(shown):])
  stats = dict(gen.stats)
  if first is not None:
    stats["time_to_first_token_seconds"] = first
  return gen, stats


def run_timed(api, model, tokenizer, prompt, kwargs):
  """A warm-up run, then a timed one; returns (Generation, stats).

  Compilation is never in the decoding time (the library times it apart); the warm-up
  keeps first-run effects out of the comparison too. compile_seconds is the warm-up's.
  """
  warm = api.generate(model, tokenizer, prompt, **kwargs)
  gen = api.generate(model, tokenizer, prompt, **kwargs)
  return gen, dict(gen.stats, compile_seconds=warm.stats["compile_seconds"])


def describe(name: str, stats: dict) -> str:
  """One human-readable stats line for stderr: the decoding speed, the rest apart.

  tokens/s counts the tokens after the first, over their time: the prompt pass that gives
  the first token (as long as the prompt, the same in every mode) and compiling are
  timed apart (`decoding.timing_stats`).
  """
  line = (f"{name}: {stats['new_tokens']} tokens, {stats['tokens_per_second']:.1f} tokens/s "
          f"({stats['decoded_tokens']} after the first in {stats['seconds']:.2f} s; apart: "
          f"prompt pass {stats['prefill_seconds']:.2f} s")
  if stats.get("compile_seconds", 0) >= 0.05:  # else: the loop was compiled already
    line += f", compiling {stats['compile_seconds']:.1f} s"
  line += ")"
  if "rounds" in stats:
    line += (f" | {stats['mean_accepted_tokens']:.2f} accepted tokens/step, "
             f"{stats['rounds']} rounds, {stats['drafts_per_round']:.2f} draft steps/round")
  return line


def load(api, args):
  """Loads (model, tokenizer, adapter, draft ids, seconds); no adapter in plain mode."""
  start = time.perf_counter()
  if args.no_compile_cache:
    os.environ["KANGAROO_JAX_NO_COMPILE_CACHE"] = "1"  # read by load_model
  from kangaroo_jax import sharding, tuning
  mesh = sharding.make_mesh(*args.mesh) if args.mesh else "auto"
  model, tokenizer = api.load_model(args.model, args.dtype, mesh=mesh,
                                    activations=args.activations, step_width=args.step_width,
                                    progress=not args.json)  # a bar when it takes a while
  adapter = draft_ids = None
  if args.mode == "kangaroo":
    adapter, stored = api.load_adapter_for(model, args.adapter, args.exit_layer,
                                           untrained=args.untrained_adapter)
    # Without --draft-vocab: the tuned size for this backend, else all the adapter stores.
    n = tuning.tuned_settings()["draft_vocab"] if args.draft_vocab is None else args.draft_vocab
    draft_ids = tuning.select_draft_ids(stored, n, strict=args.draft_vocab is not None)
  return model, tokenizer, adapter, draft_ids, time.perf_counter() - start


def drafting(args) -> dict:
  """The Kangaroo settings of this run: the tuned ones, the typed flags in their place.

  Tuned values that conflict with a typed flag are adapted (`tuning.resolve_with_notes`),
  one `note:` line on stderr each; `api.generate` resolves the same flags the same way.
  Empty in plain mode, which ignores the drafting flags.
  """
  if args.mode != "kangaroo":
    return {}
  from kangaroo_jax import tuning
  settings, notes = tuning.resolve_with_notes(
      greedy=args.temperature == 0, eta=args.threshold, gamma=args.max_draft,
      send_unconfident=None if args.send_unconfident is None else args.send_unconfident == "yes",
      tree_nodes=args.tree_nodes, tree_topk=args.tree_topk, lookup=args.lookup)
  for note in notes:
    print(note, file=sys.stderr)
  width = args.step_width
  if width is not None and width > 1 and round_block(settings) + 1 > width:
    raise CliError(f"--step-width {width} verifies at most {width - 1} drafts a round, but "
                   f"this run drafts up to {round_block(settings)} (--max-draft / --lookup): "
                   f"raise --step-width or lower them")
  return settings


def round_block(settings: dict) -> int:
  """Most tokens a Kangaroo round verifies past the pending one (0 in plain mode)."""
  return max(settings["gamma"], settings["lookup"]) if settings else 0


def memory(api, model, adapter, args, settings: dict, prompt_tokens: int):
  """Per-device bytes of weights, KV cache and adapter (`api.memory_report`) for this run."""
  from kangaroo_jax import decoding
  # Cache slots for this prompt's bucket, the new tokens asked for and what a step writes
  # past them, as the loops allocate them (`kangaroo._kangaroo_start`,
  # `decoding._plain_start`): a Kangaroo round's block plus 2, or step_width rows.
  extra = (max(round_block(settings) + 2, model.step_width) if adapter is not None
           else model.step_width - 1)
  slots = decoding.cache_size(decoding.bucket(prompt_tokens), args.max_new_tokens, extra)
  return api.memory_report(model, adapter, batch=1, slots=slots)


def compare(api, model, tokenizer, args, kwargs) -> tuple[object, dict, dict]:
  """Times kangaroo and plain decoding alike; returns (generation, stats, comparison)."""
  gen, stats = run_timed(api, model, tokenizer, args.prompt, kwargs)
  plain, plain_stats = run_timed(api, model, tokenizer, args.prompt,
                                 decode_kwargs(args, None, None, "plain"))
  return gen, stats, dict(
      speedup=stats["tokens_per_second"] / plain_stats["tokens_per_second"],
      request_speedup=plain_stats["total_seconds"] / stats["total_seconds"],
      identical=gen.token_ids[0] == plain.token_ids[0],
      mean_accepted_tokens=stats["mean_accepted_tokens"], plain_stats=plain_stats)


def report(args, out: dict) -> None:
  """The human-readable stats on stderr."""
  lines = [describe(args.mode, out["stats"])]
  if args.compare:
    lines += [describe("plain", out["plain_stats"]),
              f"speedup {out['speedup']:.2f}x (tokens/s after the first token; the whole "
              f"request, prompt pass included: {out['request_speedup']:.2f}x), outputs "
              f"token-identical: {'yes' if out['identical'] else 'no'}"]
  lines.append(out["memory"])
  lines.append(f"load {out['stats']['load_seconds']:.1f} s")
  if "time_to_first_token_seconds" in out["stats"]:
    lines[-1] += (f", time to first token {out['stats']['time_to_first_token_seconds']:.1f} s "
                  "since the command started")
  if args.compare:  # last: what the ratio means on this machine, and on an accelerator
    import jax
    from kangaroo_jax import costs
    lines.append(costs.explain_ratio(out["stats"], out["speedup"], jax.default_backend()))
  print("\n".join(lines), file=sys.stderr)


def stopped_at_limit(gen, max_new_tokens: int, eos: list) -> bool:
  """True when the answer ended because it reached max_new_tokens, not at an end token."""
  ids = gen.token_ids[0]
  return len(ids) >= max_new_tokens and ids[-1] not in eos


def limit_notice(max_new_tokens: int) -> str:
  """The stderr line for an answer cut at the token budget."""
  return (f"note: the answer stopped at --max-new-tokens {max_new_tokens} and may be cut "
          "short; raise it for more")


def fit_conversation(api, tokenizer, history: list, reserve: int, positions: int,
                     chat_template=None) -> list:
  """Drops the oldest exchanges until the conversation plus `reserve` new tokens fits."""
  while (len(history) > 1 and len(api.encode_prompt(tokenizer, history, True, chat_template))
         + reserve > positions):
    history = history[2:] if len(history) > 2 else history[1:]
  return history


NEXT_MESSAGE = 64  # tokens a chat's prompt bucket leaves for the user's next message


def chat_bucket(current: int, prompt: int, reserve: int, positions: int) -> int:
  """The padded prompt length of a chat message: the conversation's bucket while the
  prompt fits it, else one with room for this answer and the next message too.

  Every bucket is a new shape: its prompt pass and round loop compile (or load from the
  compilation cache) once. With power-of-two buckets from 32 a conversation crossed one
  nearly every message (38 tokens: 64; with a 100-token answer and the next question:
  128, then 256...); a bucket that holds the next exchange too makes a later message
  compile only every few exchanges, for a longer prompt pass (all of the bucket's rows).
  """
  from kangaroo_jax.decoding import bucket
  if bucket(prompt) <= current:
    return current
  return min(bucket(prompt + reserve + NEXT_MESSAGE), bucket(positions))


def chat(api, args) -> None:
  """The interactive loop: one user message per stdin line, answers streamed to stdout."""
  settings = drafting(args)
  model, tokenizer, adapter, draft_ids, load_seconds = load(api, args)
  from kangaroo_jax import chat_templates
  chat_templates.for_tokenizer(tokenizer, args.chat_template)  # none: the error names the flag
  kwargs = decode_kwargs(args, adapter, draft_ids, args.mode)
  # A Kangaroo round needs its block and the pending token past the budget (`pad_prompts`).
  block = round_block(settings)
  reserve = args.max_new_tokens + (block + 1 if block else 0)
  interactive = sys.stdin.isatty()
  longest = model.cfg.max_position_embeddings - reserve  # what `fit_conversation` keeps
  print(f"chat ({args.mode}; loaded in {load_seconds:.1f} s): one message per line; /reset "
        "clears the conversation, /exit or end of input ends\nat the longest conversation, "
        + memory(api, model, adapter, args, settings, longest).summary(), file=sys.stderr)
  history: list = []
  eos = api.eos_ids(model, tokenizer)
  shape = 0  # the conversation's prompt bucket (`chat_bucket`)
  while True:
    if interactive:
      print("> ", end="", file=sys.stderr, flush=True)
    line = stdin_bytes().readline()
    read_at = time.perf_counter()
    if not line:
      return
    try:
      text = utf8_text(line, "the message").strip()
    except CliError as e:  # one bad line: say so, keep the conversation
      print(f"error: {e}; skipped, the conversation goes on", file=sys.stderr, flush=True)
      continue
    if text in ("/exit", "/quit"):
      return
    if text == "/reset":
      history = []
      print("(conversation cleared)", file=sys.stderr)
      continue
    if not text:
      continue
    history = fit_conversation(api, tokenizer, history + [{"role": "user", "content": text}],
                               reserve, model.cfg.max_position_embeddings, args.chat_template)
    prompt = len(api.encode_prompt(tokenizer, history, True, args.chat_template))
    shape = chat_bucket(shape, prompt, reserve, model.cfg.max_position_embeddings)
    try:
      gen, stats = run_stream(api, model, tokenizer, history, dict(kwargs, min_bucket=shape),
                              show=True, since=read_at)
    except ValueError as e:  # e.g. one message too long for the model: report, keep chatting
      history = history[:-1]
      print(f"error: {cli.one_line(e)}", file=sys.stderr)
      continue
    print(flush=True)
    history.append({"role": "assistant", "content": gen.text})
    if stopped_at_limit(gen, args.max_new_tokens, eos):
      print(limit_notice(args.max_new_tokens), file=sys.stderr)
    summary = describe(args.mode, stats)
    if "time_to_first_token_seconds" in stats:  # from the message read to the first piece
      summary += f" | time to first token {stats['time_to_first_token_seconds']:.2f} s"
    print(summary, file=sys.stderr, flush=True)


def run(args) -> None:
  from kangaroo_jax import api  # slow (jax): only after the arguments passed validation
  if args.chat:
    return chat(api, args)
  settings = drafting(args)
  model, tokenizer, adapter, draft_ids, load_seconds = load(api, args)
  kwargs = decode_kwargs(args, adapter, draft_ids, args.mode)
  prompt_tokens = len(api.encode_prompt(tokenizer, args.prompt, not args.no_chat,
                                        args.chat_template))
  out = dict(prompt=args.prompt,
             memory=memory(api, model, adapter, args, settings, prompt_tokens).summary())
  if args.compare:
    gen, stats, comparison = compare(api, model, tokenizer, args, kwargs)
    out.update(comparison)
    if not args.json:
      print(gen.text, end="")
  else:
    gen, stats = run_stream(api, model, tokenizer, args.prompt, kwargs, show=not args.json,
                            since=STARTED)
  stats["load_seconds"] = load_seconds
  cut = stopped_at_limit(gen, args.max_new_tokens, api.eos_ids(model, tokenizer))
  out.update(text=gen.text, token_ids=gen.token_ids[0], stopped_at_max_new_tokens=cut,
             stats=stats)
  if args.json:
    print(json.dumps(out))
  else:
    print(flush=True)  # end the answer's line before the stats
    if cut:
      print(limit_notice(args.max_new_tokens), file=sys.stderr)
    report(args, out)


def main(argv=None) -> int:
  """Runs the command; returns the exit status (errors: one `error:` line, status 2)."""
  def command():
    args = build_parser().parse_args(argv)
    validate(args)
    run(args)

  # Ctrl-C here reaches in-process callers only; the command line uses _interrupt_watcher.
  return cli.exit_status(command, interrupted="\ninterrupted")


def _interrupt_watcher() -> None:
  """Turns Ctrl-C into one line and status 130 at any moment, even mid-compile.

  SIGINT is blocked in every thread (set before jax or tokenizers start theirs, which
  inherit the mask) and taken here with sigwait, so it is handled at once even while
  the main thread is inside XLA, where a Python handler would wait for it to return.
  os._exit skips the interpreter's teardown, during which XLA's threads used to abort
  the process ("terminate called without an active exception").
  """
  signal.sigwait({signal.SIGINT})
  os.write(2, b"\ninterrupted\n")
  os._exit(cli.EXIT_INTERRUPTED)


def run_command_line() -> None:
  """The command-line entry point: main() plus clean exits on Ctrl-C and a closed pipe."""
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  threading.Thread(target=_interrupt_watcher, daemon=True).start()
  try:
    code = main()
    sys.stdout.flush()
  except BrokenPipeError:
    cli.exit_quietly_on_broken_pipe()
  sys.stderr.flush()
  os._exit(code)  # no interpreter teardown under XLA's threads (see _interrupt_watcher)


if __name__ == "__main__":
  run_command_line()
