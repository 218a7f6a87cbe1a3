"""The bench command: load the model and adapter, build the methods, run, write outputs.

`bench(argv)` returns the results; `main(argv)` is the command line (one `error:` line
and status 2 on bad input). See the package docstring for the protocol and the outputs.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from typing import Optional, Sequence

from kangaroo_jax import cli
from kangaroo_jax.bench.flags import adapter_list, build_parser, csv_items, parse_methods, validate
from kangaroo_jax.bench.harness import (aggregate, check_targets, machine_info, map_count_warning,
                                        run_questions)
from kangaroo_jax.bench.methods import (DESCRIPTIONS, PeerUnavailable, hf_method, jax_kangaroo,
                                        jax_plain, kangaroo_label, load_hf_model)
from kangaroo_jax.bench.questions import load_questions, select_questions
from kangaroo_jax.bench.report import chart, default_out_dir, markdown, write_markdown_file, write_outputs
from kangaroo_jax.bench.sweep import sweep_grid, sweep_report


# Every finished prompt's records, appended while a run goes; removed once results.json holds them.
PARTIAL_RECORDS = "records.jsonl"


def run(args) -> dict:
  """Loads the model(s), runs the questions, writes the outputs; returns the results."""
  log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
  methods = parse_methods(args.methods, args.skip)
  questions = select_questions(load_questions(args.questions),
                               csv_items(args.categories) if args.categories else None,
                               args.per_category, args.offset)
  from kangaroo_jax import api, chat_templates, tuning  # slow (jax): after the cheap checks
  # Tuned values that conflict with a typed flag give way to it, a note each.
  tuned, notes = tuning.resolve_with_notes(
      gamma_flag="--gamma", eta=args.eta, gamma=args.gamma, draft_vocab=args.draft_vocab,
      send_unconfident=None if args.send_unconfident is None else args.send_unconfident == "yes",
      tree_nodes=args.tree_nodes, tree_topk=args.tree_topk, lookup=args.lookup)
  for note in notes:
    log(note)
  eta, gamma, draft_vocab, send, tree_nodes, tree_topk, lookup = (tuned[k] for k in (
      "eta", "gamma", "draft_vocab", "send_unconfident", "tree_nodes", "tree_topk", "lookup"))
  start = time.perf_counter()
  model, tokenizer = api.load_model(args.model, args.dtype, activations=args.activations)
  eos = api.eos_ids(model, tokenizer)
  need_adapter = args.sweep or "kangaroo" in methods or "hf_early_exit" in methods
  adapter, stored = (api.load_adapter_for(model, args.adapter, untrained=args.untrained_adapter)
                     if need_adapter else (None, None))
  # A tuned draft vocabulary may not fit this adapter; an explicit flag must.
  draft_ids = tuning.select_draft_ids(stored, draft_vocab, strict=args.draft_vocab is not None)
  log(f"loaded model and adapter in {time.perf_counter() - start:.1f} s")

  runners = [jax_plain(model, eos, args.max_new_tokens)]
  labels: dict[str, dict] = {}
  if args.sweep:  # the grid for one adapter, or for each of --adapters (one plain baseline)
    swept = ([(label, *api.load_adapter_for(model, path))
              for label, path in adapter_list(args.adapters)] if args.adapters
             else [(None, adapter, stored)])
    for label, one, ids in swept:
      for e, g, v, s, t, k, lk in sweep_grid(args, ids):
        name = kangaroo_label(e, g, v, s, t, k, lk, adapter=label)
        runners.append(jax_kangaroo(model, one, tuning.select_draft_ids(ids, v), eos,
                                    args.max_new_tokens, e, g, name=name, draft_vocab=v,
                                    send_unconfident=s, tree_nodes=t, tree_topk=k or 4,
                                    lookup=lk))
        labels[name] = dict(eta=e, gamma=g, draft_vocab=v, send_unconfident=s, tree_nodes=t,
                            tree_topk=k or 4, lookup=lk, **({"adapter": label} if label else {}))
    methods = ["plain"] + list(labels)
  elif args.adapters:  # one Kangaroo method per adapter file, same setting
    for label, path in adapter_list(args.adapters):
      other, other_ids = api.load_adapter_for(model, path)
      name = f"kangaroo[adapter={label}]"
      runners.append(jax_kangaroo(model, other, tuning.select_draft_ids(other_ids, draft_vocab),
                                  eos, args.max_new_tokens, eta, gamma, name=name,
                                  draft_vocab=draft_vocab, send_unconfident=send,
                                  tree_nodes=tree_nodes, tree_topk=tree_topk, lookup=lookup))
      labels[name] = dict(adapter=path)
    methods = ["plain"] + list(labels) + [m for m in methods if m.startswith("hf")]
  elif "kangaroo" in methods:
    runners.append(jax_kangaroo(model, adapter, draft_ids, eos, args.max_new_tokens, eta, gamma,
                                draft_vocab=draft_vocab, send_unconfident=send,
                                tree_nodes=tree_nodes, tree_topk=tree_topk, lookup=lookup))
  skipped = {}
  hf_names = [m for m in methods if m.startswith("hf")]
  if hf_names:
    try:
      hf_model = load_hf_model(args.hf_model or args.model, args.hf_threads)
    except PeerUnavailable as e:
      skipped = {m: str(e) for m in hf_names}
      log(f"transformers peers skipped: {e}")
    else:
      pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
      extra = {"hf": {}, "hf_pld": {"prompt_lookup_num_tokens": 10}}
      if adapter is not None:  # the LayerSkip-style peer exits where the adapter does
        extra["hf_early_exit"] = {"assistant_early_exit": adapter.acfg.exit_layer}
      runners += [hf_method(m, hf_model, eos, pad, args.max_new_tokens, **extra[m])
                  for m in hf_names]
  warning = map_count_warning(sum(1 for m in runners if not m.name.startswith("hf")))
  if warning:
    print(warning, file=sys.stderr, flush=True)
  os.makedirs(args.out, exist_ok=True)
  partial = os.path.join(args.out, PARTIAL_RECORDS)
  open(partial, "w").close()

  def keep(prompt_records):  # a run killed midway keeps every prompt it finished
    with open(partial, "a") as f:
      f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in prompt_records)

  records, failed = run_questions(questions, runners, tokenizer, log=log,
                                  max_seconds=args.max_seconds, on_prompt=keep,
                                  chat_template=chat_templates.resolve(args.chat_template))
  skipped.update(failed)
  ran = [m.name for m in runners if m.name not in skipped]
  results = dict(config=dict(
      command="python -m kangaroo_jax.bench " + " ".join(shlex.quote(a) for a in args.argv),
      date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine_info(),
      model=args.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
      adapter=(_short(args.adapters) if args.adapters
                                   else _adapter_name(args.adapter, api, adapter)), dtype=args.dtype,
      activations=args.activations, max_new_tokens=args.max_new_tokens,
      questions=_short(args.questions),
      questions_used=len({r.question_id for r in records}), prompts=sum(
          1 for r in records if r.method == "plain"),
      kangaroo=dict(eta=eta, gamma=gamma, draft_vocab=draft_vocab, send_unconfident=send,
                    tree_nodes=tree_nodes, tree_topk=tree_topk, lookup=lookup,
                    draft_vocab_size=None if draft_ids is None else len(draft_ids),
                    exit_layer=adapter.acfg.exit_layer if adapter else None),
      sweep=args.sweep), methods_run=ran, descriptions={m: DESCRIPTIONS.get(m.split("[")[0], m)
                                                         for m in ran},
      skipped=skipped, **aggregate(records, ran))
  results["targets"] = {} if args.sweep else check_targets(results["overall"])
  results["records"] = [dataclasses.asdict(r) for r in records]
  if args.costs and adapter is not None:
    from kangaroo_jax import costs as C
    log("measuring piece costs...")
    context = int(sorted(r.prompt_tokens for r in records)[len(records) // 2]) if records else 256
    results["costs"] = C.measure_costs(model, adapter, draft_ids,
                                       max_block=max(gamma, tree_nodes, lookup) + 1,
                                       context=context + args.max_new_tokens // 2,
                                       tree_topk=tree_topk if tree_nodes else 0)
    log(C.format_costs(results["costs"]))
  if args.sweep:
    results["sweep"] = sweep_report(results, labels, args, log)
  return results


def _adapter_name(path, api, adapter) -> str:
  if adapter is None:
    return "none"
  if path:
    return _short(path)
  if os.path.isfile(api.DEFAULT_ADAPTER):
    return f"shipped ({_short(api.DEFAULT_ADAPTER)})"
  return f"fresh random (exit layer {adapter.acfg.exit_layer}; untrained)"


def _short(path: str) -> str:
  """A path relative to the working directory when inside it (for the tables)."""
  rel = os.path.relpath(os.path.abspath(path))
  return path if rel.startswith("..") else rel


def bench(argv: Sequence[str]) -> dict:
  """Runs the benchmark for command-line arguments `argv`; returns the results dict.

  Writes results.json, results.md and speedup.png under --out (and --write-markdown).
  With --from-json, rebuilds the chart and markdown from a results file instead.

  Raises:
    BenchError (a ValueError) or the library's ValueErrors on bad input.
  """
  cli.set_offline_quiet_environment()  # before transformers is imported
  args = build_parser().parse_args(list(argv))
  args.argv = list(argv)
  validate(args)
  if args.out is None:  # a new folder per run: nothing the repository ships is overwritten
    args.out = default_out_dir()
  if args.from_json:
    with open(args.from_json) as f:
      results = json.load(f)
    chart_path = chart(results, os.path.join(os.path.dirname(os.path.abspath(args.from_json)),
                                             "speedup.png"))
  else:
    results = run(args)
    paths = write_outputs(results, args.out)
    # results.json holds every record now; records.jsonl only mattered if the run died.
    os.remove(os.path.join(args.out, PARTIAL_RECORDS))
    chart_path = paths["chart"]
    print(markdown(results))
    print(f"wrote {', '.join(paths.values())}", file=sys.stderr)
  if args.write_markdown:
    write_markdown_file(results, args.write_markdown, chart_path)
    print(f"updated {args.write_markdown}", file=sys.stderr)
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (2 with one `error:` line on bad input)."""
  return cli.exit_status(lambda: bench(sys.argv[1:] if argv is None else argv))
