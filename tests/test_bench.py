"""The Spec-Bench harness, the piece costs, the tuned settings and the accelerator script.

Everything runs on a tiny random Llama folder with a character-level chat tokenizer
(tests/fixtures/tiny_model.py) and a few short questions; the runs share compiled loops
by using the same token budget and Kangaroo settings.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import tiny_model  # noqa: E402

from kangaroo_jax import bench, costs, tuning  # noqa: E402
from kangaroo_jax.bench import BenchError, Method, Output, Record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lengths chosen so that every prompt, second turns included, falls in the 64-token
# bucket: the JAX loops then compile once for the whole file.
QUESTIONS = [
    dict(question_id=1, category="writing", turns=["Write a poem..", "Go"]),
    dict(question_id=2, category="qa", turns=["Why is the sky?"]),
    dict(question_id=3, category="qa", turns=["Who is she now?"], reference=["x"]),
]
# The same budget and settings everywhere: the tiny loops compile once per bucket.
COMMON = ["--max-new-tokens", "8", "--eta", "0.6", "--gamma", "3", "--draft-vocab", "0",
          "--quiet", "--hf-threads", "1", "--untrained-adapter"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
  return tiny_model.write(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def qfile(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("q") / "questions.jsonl"
  path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
  return str(path)


# ---- questions ----

def test_shipped_question_file():
  qs = bench.load_questions(bench.DEFAULT_QUESTIONS)
  cats = {q.category for q in qs}
  assert len(qs) == 26 and len(cats) == 13
  assert all(len(q.turns) == 2 for q in qs if q.category == "writing")
  assert os.path.isfile(os.path.join(os.path.dirname(bench.DEFAULT_QUESTIONS),
                                     "spec_bench_LICENSE.txt"))


@pytest.mark.parametrize("content, fragment", [
    (None, "no such questions file"),
    ("", "holds no questions"),
    ('{"question_id": 1, "category": "qa", "turns": ["a"]}\n{not json\n', ":2: not valid JSON"),
    ('[1, 2]\n', "expected a JSON object"),
    ('{"question_id": 1, "turns": ["a"]}\n', "lacks the field 'category'"),
    ('{"question_id": 1, "category": "qa", "turns": "a"}\n', "'turns' must be"),
    ('{"question_id": 1, "category": "qa", "turns": []}\n', "'turns' must be"),
    ('{"question_id": 1, "category": "qa", "turns": [" "]}\n', "'turns' must be"),
    ('{"question_id": 1, "category": "qa", "turns": ["a"]}\n'
     '{"question_id": 1, "category": "qa", "turns": ["b"]}\n', "duplicate question_id"),
])
def test_bad_question_files(tmp_path, content, fragment):
  path = tmp_path / "q.jsonl"
  if content is not None:
    path.write_text(content)
  with pytest.raises(BenchError, match=fragment.replace("[", r"\[")):
    bench.load_questions(str(path))


def test_select_questions(qfile):
  qs = bench.load_questions(qfile)
  assert [q.question_id for q in bench.select_questions(qs, per_category=1)] == [1, 2]
  assert [q.question_id for q in bench.select_questions(qs, ["qa"])] == [2, 3]
  with pytest.raises(BenchError, match="unknown category 'poetry'.*writing, qa"):
    bench.select_questions(qs, ["poetry"])
  with pytest.raises(BenchError, match="--per-category"):
    bench.select_questions(qs, per_category=0)
  # An offset skips the first questions of each category (held out for a sweep).
  assert [q.question_id for q in bench.select_questions(qs, per_category=1, offset=1)] == [3]
  with pytest.raises(BenchError, match="no questions left"):
    bench.select_questions(qs, offset=2)


def test_method_names():
  assert bench.parse_methods("hf,plain", "") == ["plain", "hf"]
  assert bench.parse_methods(",".join(bench.METHODS), "hf_pld,hf") == [
      "plain", "kangaroo", "hf_early_exit"]
  with pytest.raises(BenchError, match="unknown method 'medusa'"):
    bench.parse_methods("plain,medusa", "")
  with pytest.raises(BenchError, match="cannot be skipped"):
    bench.parse_methods("plain", "plain")


@pytest.mark.parametrize("argv, fragment", [
    (["--questions", "/no/such.jsonl"], "no such questions file"),
    (["--categories", "poetry"], "unknown category 'poetry'"),
    (["--methods", "plain,medusa"], "unknown method"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--eta", "1.5"], "--eta"),
    (["--bogus"], "unrecognized arguments"),
])
def test_cli_bad_input_is_one_line(capsys, argv, fragment):
  assert bench.main(argv) == bench.EXIT_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]


# ---- the run loop with stand-in methods (no model) ----

def _fixed(name, tok, text_for, reference="plain", fail_at=None, seen=None):
  """A method that 'decodes' by looking up a text for each prompt."""
  calls = {"n": 0}

  def run(ids):
    calls["n"] += 1
    if fail_at is not None and calls["n"] >= fail_at:
      raise RuntimeError("out of memory")
    if seen is not None:
      seen.append(tok.decode(ids))
    tokens = tok.encode(text_for(ids))
    return Output(tokens, len(tokens), max(1, len(tokens) // 2), 3)

  return Method(name, name, reference, run, lambda ids: (name, len(ids) // 32))


def test_run_questions_lossless_check_and_failing_peer(qfile):
  tok = tiny_model.tokenizer()
  qs = bench.load_questions(qfile)
  seen: list[str] = []
  answer = lambda ids: f"ok {len(ids)}."
  methods = [_fixed("plain", tok, answer, seen=seen),
             _fixed("kangaroo", tok, answer),
             _fixed("hf", tok, lambda ids: "different."),
             # Fails on its third call (warm-up + timed run of the first prompt, then boom).
             _fixed("hf_pld", tok, answer, reference="hf", fail_at=3)]
  records, skipped = bench.run_questions(qs, methods, tok)
  assert list(skipped) == ["hf_pld"] and "out of memory" in skipped["hf_pld"]
  assert {r.method for r in records} == {"plain", "kangaroo", "hf"}
  assert all(r.identical for r in records if r.method == "kangaroo")
  assert not any(r.identical for r in records if r.method == "hf")
  assert all("vs plain" in r.mismatch for r in records if r.method == "hf")
  # Every turn of every question once per method (the first prompt twice: warm-up).
  assert sum(r.method == "plain" for r in records) == 4
  # The second turn carries plain decoding's first answer.
  first = [s for s in seen if "Write a poem.." in s]
  assert any(s.endswith("Go<|im_end|>\n<|im_start|>assistant\n") and "ok " in s for s in first)
  summary = bench.aggregate(records, ["plain", "kangaroo", "hf"])
  assert summary["overall"]["kangaroo"]["lossless"] == 1.0
  assert summary["overall"]["hf"]["lossless"] == 0.0


def _rec(cat, method, tokens, seconds, verified=None, steps=None, drafts=0, identical=None):
  verified = tokens if verified is None else verified
  return Record(1, cat, 1, method, 10, tokens, seconds, verified,
                tokens if steps is None else steps, drafts, identical)


def test_records_kept_prompt_by_prompt_and_map_count_warning(qfile, tmp_path):
  """A run that dies midway has handed over every finished prompt's records."""
  tok = tiny_model.tokenizer()
  from kangaroo_jax.bench.harness import map_count_warning
  seen = []
  plain = _fixed("plain", tok, lambda ids: "abc")
  broken = _fixed("plain", tok, lambda ids: "abc", fail_at=3)  # call 3 (warm-up counted): prompt 2
  questions = bench.load_questions(qfile)
  records, _ = bench.run_questions(questions, [plain], tok, on_prompt=seen.append)
  assert [len(batch) for batch in seen] == [1] * 4 and sum(seen, []) == records
  seen.clear()
  with pytest.raises(RuntimeError):
    bench.run_questions(questions, [broken], tok, on_prompt=seen.append)
  assert len(seen) == 1  # the prompt finished before the failure
  limit = tmp_path / "max_map_count"
  limit.write_text("65530\n")
  assert "sysctl -w vm.max_map_count" in map_count_warning(8, str(limit))
  assert map_count_warning(2, str(limit)) is None
  assert map_count_warning(8, str(tmp_path / "absent")) is None


def test_aggregate_per_category_and_overall():
  records = [_rec("a", "plain", 100, 10.0), _rec("a", "kangaroo", 100, 5.0, 99, 33, 66, True),
             _rec("b", "plain", 50, 2.0), _rec("b", "kangaroo", 50, 2.0, 49, 49, 49, False),
             _rec("b", "plain", 50, 3.0), _rec("b", "kangaroo", 50, 1.0, 49, 7, 14, True)]
  out = bench.aggregate(records, ["plain", "kangaroo"])
  a, b, overall = out["categories"]["a"], out["categories"]["b"], out["overall"]
  assert a["plain"]["request_tokens_per_second"] == 10.0 and a["kangaroo"]["request_speedup"] == 2.0
  assert a["kangaroo"]["mean_accepted_tokens"] == 3.0 and a["kangaroo"]["drafts_per_round"] == 2.0
  # Speed is total tokens / total time, not a mean of per-prompt speeds.
  assert b["plain"]["request_tokens_per_second"] == 20.0
  assert b["kangaroo"]["request_tokens_per_second"] == 100 / 3
  assert b["kangaroo"]["identical"] == 1 and b["kangaroo"]["lossless"] == 0.5
  assert overall["plain"]["request_tokens_per_second"] == 200 / 15
  assert overall["kangaroo"]["request_speedup"] == pytest.approx((200 / 8) / (200 / 15))


def test_decoding_speed_leaves_the_prompt_pass_out():
  """A long prompt's pass (4 s of plain's 10 and of Kangaroo's 7) weighs on the whole-request
  ratio; the decoding columns count the tokens after the first over the time after it."""
  records = [_rec("a", "plain", 100, 10.0), _rec("a", "kangaroo", 100, 7.0, 99, 33, 66, True)]
  for r in records:
    r.first_token_seconds = 4.0
  k = bench.aggregate(records, ["plain", "kangaroo"])["overall"]["kangaroo"]
  assert k["tokens_per_second"] == 99 / 3.0 and k["decoding_seconds"] == 3.0
  assert k["speedup"] == pytest.approx(6.0 / 3.0)  # the decoding: twice as fast
  assert k["request_speedup"] == pytest.approx(10.0 / 7.0)  # the request: 1.43x


def test_missed_speed_target_says_by_how_much():
  t = bench.check_targets({"kangaroo": dict(speedup=1.2, tokens_per_second=26.0, lossless=1.0),
                           "hf": dict(tokens_per_second=25.0)})
  assert not t["speedup_vs_plain"]["met"]
  assert t["speedup_vs_plain"]["short_by"] == pytest.approx(0.2)
  assert not t["speed_vs_hf"]["met"] and t["lossless"]["met"]


def test_markdown_markers(tmp_path):
  results = _fake_results()
  md = tmp_path / "BENCHMARKS.md"
  md.write_text(f"# Title\n\nintro\n\n{bench.MARK_BEGIN}\nold\n{bench.MARK_END}\n\ntail\n")
  bench.write_markdown_file(results, str(md), str(tmp_path / "bench" / "speedup.png"))
  text = md.read_text()
  assert text.startswith("# Title\n\nintro") and text.rstrip().endswith("tail")
  assert "old" not in text and "| **overall** |" in text and "(bench/speedup.png)" in text
  (tmp_path / "plain.md").write_text("no markers")
  with pytest.raises(BenchError, match="lacks the markers"):
    bench.write_markdown_file(results, str(tmp_path / "plain.md"), None)


def test_cost_section_names_the_levers():
  results = _fake_results()
  results["costs"] = dict(
      relative=dict(plain=1.0, shallow=0.05, draft=0.1, draft_full_vocab=0.2,
                    verify={"1": 0.8, "2": 0.9, "3": 1.0, "4": 1.2}),
      seconds={}, shapes=dict(device="cpu", cache_slots=256, exit_layer=2, draft_vocab=8192,
                              vocab=49152, layers=30))
  text = bench.markdown(results)
  # Overall: 3 tokens per round, 2 drafts. Block k + 1 = 3: 0.05 + 0.2 + 1.0 = 1.25 steps;
  # a fixed block of gamma + 1 = 4: 0.05 + 0.2 + 1.2 = 1.45; a block costing verify[1]: 1.05.
  assert "| overall | 3.00 | 2.00 | 2.40x | 2.07x | 2.00x |" in text
  assert "a round costs 1.25 plain steps" in text and "needs 1.88 tokens per round" in text
  assert "no more than one position (as on an accelerator): 2.86x" in text
  # With unconfident drafts dropped, fewer drafts are verified than drafted: 2 steps but
  # 1 verified draft per round gives a block of 2: 0.05 + 0.2 + 0.9 = 1.15 steps.
  results["overall"]["kangaroo"]["verified_drafts_per_round"] = 1.0
  assert "a round costs 1.15 plain steps" in bench.markdown(results)


def _fake_results():
  records = [_rec("a", "plain", 10, 1.0), _rec("a", "kangaroo", 10, 0.5, 9, 3, 6, True)]
  return dict(config=dict(command="python -m kangaroo_jax.bench", date="today", model="m",
                          adapter="x", max_new_tokens=10, questions="q", questions_used=1,
                          prompts=1, machine=dict(device="cpu", cpu_count=2, jax="0",
                                                  jax_backend="cpu", load_average=[1.0]),
                          kangaroo=dict(eta=0.6, gamma=3, draft_vocab=None,
                                        draft_vocab_size=None, exit_layer=2)),
              methods_run=["plain", "kangaroo"], skipped={"hf": "cannot load"},
              targets={}, **bench.aggregate(records, ["plain", "kangaroo"]))


# ---- end to end on the tiny model ----

def test_end_to_end_tiny_model(tiny, qfile, tmp_path, monkeypatch):
  real = bench.hf_method

  def flaky(name, *args, **kwargs):  # the early-exit peer breaks mid-run
    m = real(name, *args, **kwargs)
    if name == "hf_early_exit":
      m.run = lambda ids: (_ for _ in ()).throw(RuntimeError("early exit unsupported"))
    return m

  monkeypatch.setattr(bench.command, "hf_method", flaky)  # where the command looks it up
  md = tmp_path / "BENCHMARKS.md"
  md.write_text(f"{bench.MARK_BEGIN}\n{bench.MARK_END}\n")
  results = bench.bench(["--model", tiny, "--questions", qfile, "--methods",
                         "plain,kangaroo,hf,hf_early_exit", "--out", str(tmp_path / "out"),
                         "--write-markdown", str(md), *COMMON])
  assert results["methods_run"] == ["plain", "kangaroo", "hf"]
  assert "early exit unsupported" in results["skipped"]["hf_early_exit"]
  overall = results["overall"]
  assert overall["plain"]["prompts"] == 4 and overall["kangaroo"]["lossless"] == 1.0
  assert overall["hf"]["mean_accepted_tokens"] == 1.0
  assert set(results["categories"]) == {"writing", "qa"}
  assert {"speedup_vs_plain", "speed_vs_hf", "lossless"} <= set(results["targets"])
  for name in ("results.json", "results.md", "speedup.png"):
    assert (tmp_path / "out" / name).stat().st_size > 0
  assert "hf_early_exit skipped" in md.read_text()
  # The markdown and chart can be rebuilt from the JSON alone.
  assert bench.main(["--from-json", str(tmp_path / "out" / "results.json"),
                     "--write-markdown", str(md)]) == 0


def test_adapters_compared_in_one_run(tiny, qfile, tmp_path):
  """--adapters: one Kangaroo method per file (shapes differ: own compiled code), each lossless."""
  from kangaroo_jax import api
  from kangaroo_jax.adapter import init_adapter, save_adapter
  model, _ = api.load_model(tiny)
  save_adapter(str(tmp_path / "a.safetensors"), init_adapter(model.cfg, 1, seed=1))
  (tmp_path / "run").mkdir()
  save_adapter(str(tmp_path / "run" / "adapter.safetensors"),
               init_adapter(model.cfg, 2, seed=2, ffn_size=32))
  results = bench.bench(["--model", tiny, "--questions", qfile, "--categories", "qa",
                         "--per-category", "1", "--methods", "plain,kangaroo",
                         "--adapters", f"first={tmp_path / 'a.safetensors'},"
                         f"{tmp_path / 'run' / 'adapter.safetensors'}",
                         "--out", str(tmp_path / "out"), *COMMON])
  names = ["kangaroo[adapter=first]", "kangaroo[adapter=run]"]
  assert results["methods_run"] == ["plain", *names]
  for n in names:
    assert results["overall"][n]["lossless"] == 1.0
  assert results["overall"][names[0]]["prompts"] == 1


@pytest.mark.parametrize("argv, fragment", [
    (["--adapters", "/no/such.safetensors"], "no such adapter file"),
    (["--adapters", "x=/no/a", "--sweep"], "no such adapter file"),
])
def test_adapters_flag_bad_input(capsys, argv, fragment):
  assert bench.main(argv) == bench.EXIT_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and fragment in err[0]


def test_adapters_flag_names_and_conflicts(tmp_path):
  from kangaroo_jax.bench.flags import adapter_list, adapter_list_checks
  assert adapter_list("a=x/y.safetensors,runs/e4/adapter.safetensors,v4.safetensors") == [
      ("a", "x/y.safetensors"), ("e4", "runs/e4/adapter.safetensors"), ("v4", "v4.safetensors")]
  f = tmp_path / "v.safetensors"
  f.write_bytes(b"")
  args = bench.build_parser().parse_args(["--adapters", f"{f},{f}", "--sweep", "--write-tuned"])
  failed = [m for ok, m in adapter_list_checks(args) if not ok]
  assert any("share a name" in m for m in failed) and any("--write-tuned" in m for m in failed)
  args = bench.build_parser().parse_args(["--adapters", f"a={f},b={f}", "--sweep"])
  assert all(ok for ok, _ in adapter_list_checks(args))  # a sweep per adapter is fine


def test_sweep_over_several_adapters_keeps_a_best_per_adapter(tiny, qfile, tmp_path):
  """--sweep --adapters: the grid for each file beside one plain baseline, one best each."""
  from kangaroo_jax import api
  from kangaroo_jax.adapter import init_adapter, save_adapter
  model, _ = api.load_model(tiny)
  for name, seed in (("a", 1), ("b", 2)):
    save_adapter(str(tmp_path / f"{name}.safetensors"), init_adapter(model.cfg, 1, seed=seed))
  results = bench.bench(["--sweep", "--model", tiny, "--questions", qfile, "--categories", "qa",
                         "--sweep-eta", "0.3,0.9", "--sweep-gamma", "2",
                         "--sweep-draft-vocab", "stored", "--sweep-send-unconfident", "no",
                         "--adapters", f"{tmp_path / 'a.safetensors'},{tmp_path / 'b.safetensors'}",
                         "--out", str(tmp_path / "out"), *COMMON])
  rows = results["sweep"]["rows"]
  assert [(r["adapter"], r["eta"]) for r in rows] == [("a", 0.3), ("a", 0.9), ("b", 0.3), ("b", 0.9)]
  assert results["methods_run"][0] == "plain" and len(results["methods_run"]) == 5
  best = results["sweep"]["best_per_adapter"]
  assert set(best) == {"a", "b"} and all(b["adapter"] == a for a, b in best.items())
  assert results["sweep"]["tuned_file"] is None and not (tmp_path / "out" / "tuned.json").exists()


def test_peer_that_cannot_load_is_skipped(tiny, qfile, tmp_path):
  results = bench.bench(["--model", tiny, "--questions", qfile, "--categories", "qa",
                         "--per-category", "1", "--methods", "plain,hf_pld",
                         "--hf-model", str(tmp_path / "missing"), "--out", str(tmp_path), *COMMON])
  assert results["methods_run"] == ["plain"]
  assert "cannot load" in results["skipped"]["hf_pld"]
  assert results["overall"]["plain"]["prompts"] == 1


def test_sweep_writes_tuned_settings(tiny, qfile, tmp_path):
  path = tmp_path / "tuned" / "cpu.json"
  results = bench.bench(["--sweep", "--model", tiny, "--questions", qfile, "--categories", "qa",
                         "--sweep-eta", "0.3,0.9", "--sweep-gamma", "3",
                         "--sweep-draft-vocab", "stored,0", "--sweep-send-unconfident", "yes",
                         "--tuned-file", str(path),
                         "--out", str(tmp_path / "out"), *COMMON])
  rows = results["sweep"]["rows"]
  # A fresh adapter stores no draft vocabulary: 'stored' and 0 are the same setting.
  assert [(r["eta"], r["gamma"], r["draft_vocab"]) for r in rows] == [(0.3, 3, 0), (0.9, 3, 0)]
  assert all(r["lossless"] == 1.0 for r in rows)
  saved = json.loads(path.read_text())
  assert saved["measured"]["speedup"] > 0
  assert tuning.tuned_settings(path=str(path)) == results["sweep"]["best"]


def test_sweep_grid_covers_send_unconfident():
  args = bench.build_parser().parse_args(["--sweep", "--sweep-eta", "0.5", "--sweep-gamma", "2,4",
                                          "--sweep-draft-vocab", "stored"])
  grid = bench.sweep_grid(args, stored=[5, 6, 7])
  assert grid == [(0.5, 2, None, True, 0, 0, 0), (0.5, 4, None, True, 0, 0, 0),
                  (0.5, 2, None, False, 0, 0, 0), (0.5, 4, None, False, 0, 0, 0)]
  assert len({bench.kangaroo_label(*g) for g in grid}) == 4
  args.sweep_send_unconfident = "yes,perhaps"
  with pytest.raises(BenchError, match="--sweep-send-unconfident"):
    bench.sweep_grid(args, stored=None)


def test_sweep_grid_puts_trees_beside_the_chain():
  """Trees are swept with send yes only, and never with more nodes than top-k x gamma."""
  args = bench.build_parser().parse_args([
      "--sweep", "--sweep-eta", "0.5", "--sweep-gamma", "2", "--sweep-draft-vocab", "stored",
      "--sweep-tree-nodes", "0,4,16", "--sweep-tree-topk", "2,4"])
  grid = bench.sweep_grid(args, stored=None)
  assert grid == [(0.5, 2, 0, True, 0, 0, 0), (0.5, 2, 0, False, 0, 0, 0),
                  (0.5, 2, 0, True, 4, 2, 0), (0.5, 2, 0, True, 4, 4, 0)]
  assert len({bench.kangaroo_label(*g) for g in grid}) == 4


def test_sweep_grid_puts_prompt_lookup_on_chains_only():
  args = bench.build_parser().parse_args([
      "--sweep", "--sweep-eta", "0.5", "--sweep-gamma", "2", "--sweep-draft-vocab", "stored",
      "--sweep-send-unconfident", "no", "--sweep-tree-nodes", "0,4", "--sweep-tree-topk", "2",
      "--sweep-lookup", "0,8"])
  grid = bench.sweep_grid(args, stored=None)
  assert grid == [(0.5, 2, 0, False, 0, 0, 0), (0.5, 2, 0, False, 0, 0, 8)]
  assert bench.kangaroo_label(*grid[1]).endswith(",lookup=8]")
  args.sweep_lookup = "-1"
  with pytest.raises(BenchError, match="lookup >= 0"):
    bench.sweep_grid(args, stored=None)


# ---- tuned settings ----

def test_tuned_settings_defaults_and_damage(tmp_path):
  assert tuning.tuned_settings(path=str(tmp_path / "none.json")) == tuning.DEFAULTS
  bad = tmp_path / "bad.json"
  bad.write_text('{"eta": 2, "gamma": 3}')
  with pytest.warns(UserWarning, match="eta must be"):
    assert tuning.tuned_settings(path=str(bad)) == tuning.DEFAULTS
  bad.write_text("{")
  with pytest.warns(UserWarning):
    assert tuning.tuned_settings(path=str(bad)) == tuning.DEFAULTS
  good = tuning.write_tuned(dict(eta=0.5, gamma=4, draft_vocab=2048), str(tmp_path / "g.json"))
  # Files written before send_unconfident and tree drafting existed mean the paper's chain.
  assert tuning.tuned_settings(path=good) == dict(eta=0.5, gamma=4, draft_vocab=2048,
                                                 send_unconfident=True, tree_nodes=0, tree_topk=4,
                                                 lookup=0)
  bad.write_text('{"eta": 0.5, "gamma": 3, "tree_nodes": -2}')
  with pytest.warns(UserWarning, match="tree_nodes must be an integer >= 0"):
    assert tuning.tuned_settings(path=str(bad)) == tuning.DEFAULTS
  bad.write_text('{"eta": 0.5, "gamma": 3, "send_unconfident": "no"}')
  with pytest.warns(UserWarning, match="send_unconfident must be true or false"):
    assert tuning.tuned_settings(path=str(bad)) == tuning.DEFAULTS
  cpu = tuning.write_tuned(dict(eta=0.4, gamma=2, draft_vocab=None, send_unconfident=False),
                           str(tmp_path / "c.json"))
  assert tuning.tuned_settings(path=cpu)["send_unconfident"] is False
  assert tuning.tuned_path("gpu").endswith(os.path.join("tuned", "gpu.json"))


def test_select_draft_ids():
  stored = np.arange(100, 110)
  assert tuning.select_draft_ids(stored, None).tolist() == stored.tolist()
  assert tuning.select_draft_ids(stored, 0) is None
  assert tuning.select_draft_ids(stored, 3).tolist() == [100, 101, 102]
  with pytest.raises(tuning.TuningError, match="10 draft ids"):
    tuning.select_draft_ids(stored, 11)
  assert len(tuning.select_draft_ids(stored, 11, strict=False)) == 10
  assert tuning.select_draft_ids(None, 5, strict=False) is None


# ---- piece costs ----

def test_projection_arithmetic():
  rel = {"shallow": 0.05, "draft": 0.1, "verify": {1: 0.8, 2: 0.9, 3: 1.0, 4: 1.2}}
  # 2 drafts, 2.5 tokens per round, verify T=3: 0.05 + 0.2 + 1.0 = 1.25 plain steps.
  assert costs.project_speedup(rel, 2.5, 2.0, 3) == pytest.approx(2.0)
  assert costs.verify_cost(rel, 2.5) == pytest.approx(0.95)
  assert costs.verify_cost(rel, 9) == 1.2  # beyond the measured blocks: the largest
  rows = costs.projection_table(rel, 3, [("x", 2.5, 2.0)])
  assert rows[0]["fixed_block"] == pytest.approx(2.5 / 1.45)
  assert rows[0]["variable_block"] == pytest.approx(2.0)
  # Sparse measured blocks (a large model times only a few): linear between neighbours.
  sparse = dict(rel, verify={1: 1.0, 5: 1.4, 9: 2.2}, tree_draft=0.3)
  assert costs.verify_cost(sparse, 3) == pytest.approx(1.2)
  assert costs.verify_cost(sparse, 7) == pytest.approx(1.8)
  assert costs.verify_cost(sparse, 0.5) == 1.0
  # A tree round of 3 depths: the root's draft step, then two tree depths.
  assert costs.round_cost(sparse, 3.0, 9, tree=True) == pytest.approx(0.05 + 0.1 + 0.6 + 2.2)


def test_costs_command_tiny(tmp_path, capsys):
  """Sparse blocks and a layer override on the command line; bad flags are one line."""
  out = tmp_path / "c.json"
  assert costs.main(["--preset", "tiny", "--layers", "3", "--blocks", "1,3,5", "--iters", "2",
                     "--tree-topk", "2", "--dtype", "float32", "--adapter-ffn", "16",
                     "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["shapes"]["layers"] == 3 and result["shapes"]["adapter_ffn"] == 16
  assert sorted(int(t) for t in result["relative"]["verify"]) == [1, 3, 5]
  assert result["relative"]["tree_draft"] > 0
  # Projection from a bench run's measured acceptance (a chain and a tree row).
  bench_json = tmp_path / "results.json"
  tree_name = "kangaroo[eta=0.6,gamma=6,vocab=stored,send=yes,tree=8/4]"
  row = dict(mean_accepted_tokens=1.5, drafts_per_round=2.0, verified_drafts_per_round=4.0,
             speedup=0.7)
  bench_json.write_text(json.dumps(dict(config=dict(kangaroo=dict(tree_nodes=0)), overall={
      "plain": dict(mean_accepted_tokens=1.0), "kangaroo": row, tree_name: row})))
  assert costs.main(["--preset", "tiny", "--blocks", "1,5", "--iters", "2", "--tree-topk", "4",
                     "--dtype", "float32", "--project-from", str(bench_json),
                     "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["measured_projection"]
  assert [(r["method"], r["tree"]) for r in rows] == [("kangaroo", False), (tree_name, True)]
  rel = json.loads(out.read_text())["relative"]
  rel["verify"] = {int(t): c for t, c in rel["verify"].items()}
  assert rows[1]["projected"] == pytest.approx(1.5 / costs.round_cost(rel, 2.0, 5, tree=True))
  capsys.readouterr()
  (tmp_path / "bad.json").write_text("{}")
  assert costs.main(["--preset", "tiny", "--project-from", str(tmp_path / "bad.json")]) == 2
  assert "not a bench results.json" in capsys.readouterr().err
  assert costs.main(["--preset", "tiny", "--layers", "9"]) == 2
  assert costs.main(["--preset", "tiny", "--blocks", "1,x"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "--layers" in err[0] and "--blocks" in err[1]


# ---- the accelerator script, tiny on the CPU ----

@pytest.mark.slow
def test_accelerator_check_tiny(tiny, qfile, tmp_path):
  spec = importlib.util.spec_from_file_location(
      "accelerator_check", os.path.join(ROOT, "scripts", "accelerator_check.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert script.main(["--tiny", "--model", tiny, "--questions", qfile, "--gamma", "3",
                      "--out", str(tmp_path), "--budget-seconds", "900"]) == 0
  out = json.loads((tmp_path / "accelerator.json").read_text())
  assert out["errors"] == {} and out["skipped_steps"] == {}
  # The oracle table: every row ran, every draft was accepted, Kangaroo equals plain.
  rows = out["oracle"]["rows"]
  assert out["oracle"]["skipped"] == [] and len(rows) == len(script.oracle_rows(True))
  chain = [r for r in rows if r["kind"] == "kangaroo" and not r["tree"]]
  assert all(r["identical"] for r in chain)
  assert all(r["tokens_per_step"] > r["gamma"] + 0.5 for r in chain)
  assert {r["mode"] for r in rows} == set(script.oracle_modes())
  # The tests ran on this device (a tiny subset here) and passed.
  (run,) = out["tests"]["runs"]
  assert run["returncode"] == 0 and "passed" in run["summary"] and run["failed"] == []
  # No cache copies in the compiled loop calls but single-row verification's, which copies
  # each deep layer's cache by design (`model.Attention`, one sum), counted in its branches;
  # every call updates the donated state's caches in place.
  assert {r["step_width"] for r in out["copies"]["rows"]} == {1, 8}
  for r in out["copies"]["rows"]:
    assert r["cache_in_hlo"] and r["copies"] == 0, r
    assert r["verification_copies"] <= r["designed_verification_copies"], r
    assert r["caches_aliased"] == r["caches"] > 0, r
  # The 7B piece costs, on tiny shapes here.
  c = out["costs_7b"]
  rel = c["relative"]
  assert rel["plain"] == 1.0 and set(rel["verify"]) == {"1", "2"}
  assert all(v > 0 for v in [rel["shallow"], rel["draft"], rel["draft_full_vocab"],
                             *rel["verify"].values()])
  assert c["shapes"]["dtype"] == "bfloat16" and c["shapes"]["layers"] == costs.TINY.num_layers
  # The benchmark on the tiny model in the lossless bfloat16-weights mode, and the projection.
  assert out["bench"]["overall"]["kangaroo"]["lossless"] == 1.0
  assert (out["bench"]["config"]["dtype"], out["bench"]["config"]["activations"]) == (
      "bfloat16", "float32")
  assert any(r["category"] == "overall" for r in out["projection"])
  md = (tmp_path / "accelerator.md").read_text()
  for heading in ("## Oracle model", "## Tests on this device", "## KV-cache copies",
                  "## Piece costs", "Projected 7B speedup"):
    assert heading in md
  assert "bfloat16 weights, float32 activations: " in md and "prompts identical" in md


def test_accelerator_check_refuses_an_unknown_step(capsys):
  spec = importlib.util.spec_from_file_location(
      "accelerator_check", os.path.join(ROOT, "scripts", "accelerator_check.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  with pytest.raises(SystemExit) as e:
    script.parse_args(["--steps", "oracle,nope"])
  assert e.value.code == 2 and "unknown step 'nope'" in capsys.readouterr().err
