"""Chat templates at inference: the one Vicuna v1.1 definition, shared with training."""
import pytest
import tokenizers
import transformers

from kangaroo_jax import api, chat_templates, data
from kangaroo_jax.chat_templates import ChatTemplateError

WORDS = ["A", "chat", "USER:", "ASSISTANT:", "hi", "there"]


def make_tokenizer(folder=None):
  """A whitespace word-level tokenizer with <s>/</s> and no chat template."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i for i, w in enumerate(WORDS, start=3)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")
  if folder:
    fast.save_pretrained(folder)
    fast = transformers.AutoTokenizer.from_pretrained(folder)
  return fast


def test_vicuna_is_fastchats_v1_1_format():
  tok = make_tokenizer()
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"},
              {"role": "user", "content": "hi"}]
  text = tok.apply_chat_template(messages, chat_template=chat_templates.VICUNA, tokenize=False,
                                 add_generation_prompt=True)
  assert text == ("<s>A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's "
                  "questions. USER: hi ASSISTANT: there</s>USER: hi ASSISTANT:")


def test_decoding_formats_prompts_as_training_does():
  """encode_prompt's ids are the ids training renders for the same turns (data._template)."""
  from configs import llama7b
  tok = make_tokenizer()
  trained = llama7b.get_config().data.chat_template
  assert trained == chat_templates.VICUNA  # one definition
  messages = [{"role": "user", "content": "hi there"}]
  want = data._encode(tok, data._template(tok, messages, True, chat_templates.resolve(trained)))
  assert api.encode_prompt(tok, "hi there", chat_template="vicuna") == want
  assert api.encode_prompt(tok, messages, chat_template=chat_templates.VICUNA) == want
  assert want[0] == tok.bos_token_id and want.count(tok.bos_token_id) == 1


def test_without_a_template_the_error_names_the_flag(tmp_path):
  tok = make_tokenizer()
  with pytest.raises(ChatTemplateError, match="has no chat template: pass --chat-template vicuna"):
    api.encode_prompt(tok, "hi")
  assert api.encode_prompt(tok, "hi", chat=False) == [tok.convert_tokens_to_ids("hi")]
  # A checkpoint whose folder says Vicuna gets Vicuna's format (documented in the README).
  named = make_tokenizer(str(tmp_path / "vicuna-7b-v1.3"))
  assert api.encode_prompt(named, "hi") == api.encode_prompt(tok, "hi", chat_template="vicuna")
  other = make_tokenizer(str(tmp_path / "llama-2-7b"))
  with pytest.raises(ChatTemplateError):
    api.encode_prompt(other, "hi")


def test_names_files_and_text(tmp_path):
  assert chat_templates.resolve("chatml") == chat_templates.CHATML
  assert chat_templates.resolve(None) is None
  path = tmp_path / "t.jinja"
  path.write_text("{{ messages[0]['content'] }}")
  assert chat_templates.resolve(str(path)) == "{{ messages[0]['content'] }}"
  assert chat_templates.resolve("{{ x }}") == "{{ x }}"
  with pytest.raises(ChatTemplateError, match="unknown chat template 'alpaca': use vicuna, chatml"):
    chat_templates.resolve("alpaca")
  tok = make_tokenizer()
  chatml = api.encode_prompt(tok, "hi", chat_template="chatml")
  assert tok.decode(chatml) != tok.decode(api.encode_prompt(tok, "hi", chat_template="vicuna"))
