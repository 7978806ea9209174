"""Load a base model, quantize it, attach LoRA: mlx-lm does the work.

Also builds `tiny`, the demo model: a small Llama with a byte-level BPE
tokenizer trained on the demo corpus, written once as an ordinary mlx-lm model
directory (so `mlx_lm.load` and `mlx_lm generate` take it like any other).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from errors import UserError

# transformers (under mlx-lm) warns that PyTorch is missing: MLX does the work here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parent.parent
QUANT_GROUP_SIZE = 64

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


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    path: str  # what the user named, resolved: an HF id or an absolute local path
    quantized_bits: int | None


# ---------------------------------------------------------------------------
# loading


def resolve_model(name: str) -> str:
    """`tiny` -> its built directory; a local dir -> its absolute path; else an HF id."""
    if name == "tiny":
        return str(ensure_tiny_model())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{name}: not an mlx-lm model directory (no config.json)")
        return str(path.resolve())
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_like_path:
        raise UserError(f"{name}: model not found (neither a local directory nor an HF id like 'mlx-community/NAME')")
    return name


def load_model(name: str, quantize_bits: int, trust_remote_code: bool = False) -> LoadedModel:
    """Load with mlx-lm; quantize a non-quantized base (group size 64) unless bits is 0."""
    from mlx_lm.utils import load, quantize_model

    resolved = resolve_model(name)
    try:
        model, tokenizer, model_config = load(
            resolved,
            tokenizer_config={"trust_remote_code": trust_remote_code},
            return_config=True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # mlx-lm / huggingface_hub raise many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{name}: cannot load model ({reason})") from None

    quantization = model_config.get("quantization")
    if quantization:
        bits = quantization.get("bits")
    elif quantize_bits > 0:
        model, _ = quantize_model(model, model_config, group_size=QUANT_GROUP_SIZE, bits=quantize_bits)
        bits = quantize_bits
    else:
        bits = None
    return LoadedModel(model=model, tokenizer=tokenizer, path=resolved, quantized_bits=bits)


def attach_lora(model: nn.Module, rank: int, alpha: float, layers: int, dropout: float, seed: int) -> tuple[int, str | None]:
    """Freeze the base and put mlx-lm LoRA layers on the last `layers` blocks.

    Returns the number of blocks that got LoRA and a note when the request was
    more than the model has. The LoRA A matrices are drawn from `seed`.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    total = len(model.layers)
    note = None
    if layers == -1:
        num_layers = total
    elif layers > total:
        num_layers = total
        note = f"--lora-layers {layers} is more than the model's {total} layers; using all {total}"
    else:
        num_layers = layers
    model.freeze()
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, lora_parameters(rank, alpha, dropout))
    return num_layers, note


def lora_parameters(rank: int, alpha: float, dropout: float) -> dict:
    # mlx-lm's LoRA multiplies by `scale`; the usual alpha / rank convention.
    return {"rank": rank, "scale": alpha / rank, "dropout": dropout}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; quantized weights counted as the weights they stand for."""
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, get_total_parameters(model)


def tokenizer_key(loaded: LoadedModel) -> str:
    """What identifies how this model tokenizes, for the corpus index cache."""
    tokenizer = loaded.tokenizer
    template = getattr(tokenizer, "chat_template", None) or ""
    blob = json.dumps([loaded.path, len(tokenizer.get_vocab()), tokenizer.eos_token_id,
                       hashlib.sha256(str(template).encode()).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def adapter_config(model_path: str, num_layers: int, rank: int, alpha: float, dropout: float) -> dict:
    """What mlx_lm needs to rebuild the LoRA layers, plus the base model."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": lora_parameters(rank, alpha, dropout),
        "model": model_path,
    }


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


# ---------------------------------------------------------------------------
# the tiny demo model


def tiny_cache_dir() -> Path:
    return Path(os.environ.get("DISTRUST_QLORA_CACHE", REPO_ROOT / ".cache"))


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
    target = tiny_cache_dir() / f"tiny-{digest.hexdigest()[:12]}"

    def build(scratch: Path) -> None:
        _write_tiny_tokenizer(scratch, texts)
        _write_tiny_weights(scratch)

    return build_model_dir_once(target, build, "the tiny demo model")


def build_model_dir_once(target: Path, build, what: str) -> Path:
    """`target`, built by `build(scratch_dir)` the first time it is asked for.

    Built beside the target and renamed, so a concurrent or killed build never
    leaves a half-written model that a later run would take.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Building {what} in {target} (once) ...", file=sys.stderr)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
    try:
        build(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target


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
