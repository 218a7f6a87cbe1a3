"""The embedded SmolLM2-135M-Instruct: the shipped adapter's recipe (self-distilled data).

  python train.py --config configs/smollm2_135m.py
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_path = ""           # "" = the embedded GGUF; else a HF folder or .gguf file
  c.dtype = "float32"
  c.exit_layer = 2            # shallow layers in the draft
  c.adapter_heads = 0         # 0 = the model's head count
  c.init_from = ""            # an adapter file to start from (its weights and draft vocabulary)
  c.adapter_ffn = 0           # 0 = the paper's adapter; N = a SwiGLU FFN of width N after the attention
  c.draft_vocab = 8192        # 0 = full vocabulary; else the N most frequent answer tokens

  c.data = ml_collections.ConfigDict()
  c.data.source = "magpie"    # magpie | sharegpt | tfds | teacher
  c.data.path = ""            # sharegpt: file/glob; tfds: name or prepared dir; teacher: cache folders, comma-separated; magpie: shard dir ("" = workdir/magpie)
  c.data.split = "train"      # tfds split
  c.data.tfds_data_dir = ""
  c.data.chat_template = ""   # "" = the tokenizer's own
  c.data.eval_examples = 48   # held out from the training conversations
  c.data.eval_shards = 1      # teacher: the first N shards of each cache are held out
  c.data.magpie_num = 951
  c.data.magpie_batch = 32
  c.data.magpie_user_max = 128  # room for the steered openings' passages
  c.data.magpie_answer_max = 160
  c.data.magpie_user_temperature = 1.0
  c.data.magpie_answer_temperature = 0.0  # greedy: the text Spec-Bench decoding sees
  c.data.magpie_top_p = 1.0     # plain temperature-1 sampling of user turns (Magpie)
  # User-turn openings cycled over each batch's rows: "" is pure Magpie; the others steer
  # the model to write the task kinds Spec-Bench asks for (copying from a text, translating,
  # step-by-step math, code) that it rarely writes unprompted.
  c.data.magpie_user_starts = (
      "", "", "", "",
      "Translate the following sentence into English: ",
      "Summarize the following text in a few sentences:\n\n",
      "Read the passage and answer the question at the end.\n\nPassage: ",
      "Solve this math word problem step by step: ",
      "Write a Python function that ",
      "Extract the names, dates and numbers from this text:\n\n",
      "Write a short story about ",
      "Pretend you are ",
      "Rewrite this paragraph in a more formal tone:\n\n",
  )
  c.data.teacher_top_k = 20

  c.workdir = "runs/smollm2_135m"
  c.export_path = ""          # "" = workdir/adapter.safetensors
  c.seq_len = 256
  # Padded widths below seq_len: each batch is drawn from one width and padded to it
  # (`data.Batches`); () pads every batch to seq_len.
  c.length_buckets = ()
  c.batch_size = 8
  c.steps = 800
  c.lr = 4e-3
  c.warmup_steps = 30
  c.end_lr_fraction = 0.05
  c.weight_decay = 0.0
  c.b1 = 0.9
  c.b2 = 0.95
  c.grad_clip = 1.0
  c.seed = 0

  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 50
  c.keep_checkpoints = 3

  c.mesh_data = -1            # -1 = every device on the 'data' axis
  c.mesh_model = 1
  c.fsdp = False              # True: frozen weights and adapter state also split over 'data'
  c.distributed = False       # call jax.distributed.initialize (TPU pods: no address needed)
  c.coordinator_address = ""
  c.num_processes = 1
  c.process_id = 0
  return c
