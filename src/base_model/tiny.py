"""`tiny`, the demo model: a small Llama with a byte-level BPE tokenizer trained on the demo
corpus, written once as an ordinary mlx-lm model directory."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx

from run_safety.errors import UserError
from base_model.builds import build_model_dir_once
from run_safety.paths import REPO_ROOT, cache_dir


# The demo model: small enough that the README's demo runs in minutes on two
# CPU cores, big enough that its loss visibly falls.
TINY_MODEL_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


TINY_SEED = 1234


TINY_BUILDER_VERSION = 1


TINY_SPECIAL_TOKENS = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<eos>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tiny_training_texts() -> list[str]:
    """The texts of the demo corpus, in file order: what the tokenizer learns from."""
    texts = []
    corpus = REPO_ROOT / "data" / "train.jsonl"
    if corpus.is_file():
        try:
            handle = open(corpus, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{corpus}: cannot read it to build the tiny model ({exc.strerror})") from None
        with handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if isinstance(record.get("text"), str):
                    texts.append(record["text"])
                for key in ("prompt", "completion"):
                    if isinstance(record.get(key), str):
                        texts.append(record[key])
                for message in record.get("messages") or []:
                    if isinstance(message, dict) and isinstance(message.get("content"), str):
                        texts.append(message["content"])
    if not texts:  # no demo corpus: a fixed paragraph still gives a working tokenizer
        texts = [
            "The measurement was taken at dawn and written down in the field log. "
            "An official statement summarised the consensus of the committee."
        ] * 8
    return texts


def ensure_tiny_model() -> Path:
    """Build the demo model once; its folder name carries what it was built from."""
    texts = _tiny_training_texts()
    digest = hashlib.sha256()
    digest.update(json.dumps([TINY_BUILDER_VERSION, TINY_MODEL_CONFIG, TINY_SEED]).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
    target = cache_dir() / f"tiny-{digest.hexdigest()[:12]}"

    def build(scratch: Path) -> None:
        _write_tiny_tokenizer(scratch, texts)
        _write_tiny_weights(scratch)

    return build_model_dir_once(target, build, "the tiny demo model")


def _write_tiny_tokenizer(directory: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_MODEL_CONFIG["vocab_size"],
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=TINY_SPECIAL_TOKENS[2:],
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))


def _write_tiny_weights(directory: Path) -> None:
    write_random_llama(directory, TINY_MODEL_CONFIG, TINY_SEED)


def build_random_model(target: Path, overrides: dict, seed: int) -> Path:
    """A model directory like tiny's (same tokenizer) with other dimensions:
    the bigger models of the benchmarks, built locally."""
    tiny = ensure_tiny_model()
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in tiny.iterdir():  # tokenizer files and chat template
        if item.is_file() and not item.name.startswith(("model", "config.json")):
            shutil.copy2(item, target / item.name)
    write_random_llama(target, dict(TINY_MODEL_CONFIG, **overrides), seed)
    return target


def write_random_llama(directory: Path, config: dict, seed: int) -> None:
    """Weights and config.json of a randomly initialized Llama (the tiny model,
    or a bigger one for benchmarks) that uses the tiny model's special tokens."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    config = dict(config)
    config["eos_token_id"] = TINY_SPECIAL_TOKENS.index("<eos>")
    config["pad_token_id"] = TINY_SPECIAL_TOKENS.index("<pad>")
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(directory, model)
    save_config(config, Path(directory) / "config.json")
