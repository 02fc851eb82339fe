"""Tokenizers: load any `tokenizers` JSON (e.g. the original pile_tokenizer.json), or train the embedded one.

The model never sees text, only ids, so this module is the one place that knows which ids are special:
end-of-text and pad are looked up among the tokenizer's own special tokens, never assumed.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TachyonError
from .files import atomic_write

EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints and shard metadata store it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Tokenizer:
    """A loaded `tokenizers.Tokenizer` plus what training needs to know about it.

    `vocab_size` counts added tokens too, so every id the tokenizer can emit is below it.
    `encode` adds no special tokens (documents are joined with `eot_id` by the caller) and encodes a
    special token's text that appears in the input (a literal `<|endoftext|>`) as ordinary text, so text
    can never forge a document boundary; `decode` keeps special ids, so decode(encode(text)) == text.
    """

    path: Path
    sha256: str
    vocab_size: int
    eot_id: int
    pad_id: int | None  # None when the tokenizer has no pad token: then nothing is masked as padding
    backend: object = field(repr=False)  # the tokenizers.Tokenizer

    @property
    def fill_id(self) -> int:
        """The id to pad batches with: pad, or end-of-text for tokenizers without a pad token."""
        return self.eot_id if self.pad_id is None else self.pad_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once, in parallel inside the Rust library."""
        fast = getattr(self.backend, "encode_batch_fast", None)  # tokenizers >= 0.21: skips offsets
        encodings = (fast or self.backend.encode_batch)(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are kept so nothing is silently dropped."""
        return self.backend.decode(list(ids), skip_special_tokens=False)


def _special_id(backend, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizers` JSON file; TachyonError when it is missing, does not parse, or has no end-of-text token."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise TachyonError(f"tokenizer file {path} not found; pass --tokenizer with a tokenizers JSON file "
                           "(e.g. the original pile_tokenizer.json)")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception subclasses with long messages
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TachyonError(f"tokenizer file {path} does not parse as a tokenizers JSON ({first}); "
                           "pass the tokenizer.json saved by the `tokenizers` library") from None
    eot_id = _special_id(backend, EOT_NAMES)
    if eot_id is None:
        raise TachyonError(f"tokenizer {path} has no end-of-text token (looked for {', '.join(EOT_NAMES)}); "
                           "add one as a special token")
    pad_id = _special_id(backend, PAD_NAMES)
    backend.encode_special_tokens = True  # a literal "<|endoftext|>" in text is text, never the special id
    return Tokenizer(path=path.resolve(), sha256=file_sha256(path), vocab_size=backend.get_vocab_size(),
                     eot_id=eot_id, pad_id=pad_id, backend=backend)


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """`n` rounded up to a multiple of `multiple` (embedding tables that are multiples of 64 run faster)."""
    return -(-n // multiple) * multiple


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer that can emit ids at or above the model's `vocab_size`."""
    if tokenizer.vocab_size > vocab_size:
        raise TachyonError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                           f"is {vocab_size}: use the tokenizer the model was trained with, or a model with "
                           f"vocab_size >= {padded_vocab_size(tokenizer.vocab_size)}")


def check_same_tokenizer(recorded_sha256: str | None, tokenizer: Tokenizer, source: str, explicit: bool) -> None:
    """Refuse a tokenizer other than the one `source` (a checkpoint) was trained with, by file hash.

    Ids only mean text through the tokenizer that made them: another one decodes the model's output to garbage
    and trains it on shifted meanings. A tokenizer the user named explicitly (`explicit`) only gets a warning on
    stderr, for the rare deliberate case; nothing is checked when the source records no hash.
    """
    if not recorded_sha256 or recorded_sha256 == tokenizer.sha256:
        return
    what = (f"{source} was trained with the tokenizer of sha256 {recorded_sha256[:12]}..., but {tokenizer.path} "
            f"has sha256 {tokenizer.sha256[:12]}...")
    if explicit:
        print(f"warning: {what}; going on because --tokenizer was given explicitly", file=sys.stderr)
        return
    raise TachyonError(f"{what}; pass --tokenizer with the tokenizer it was trained with (or, to use this one "
                       "anyway, pass it explicitly with --tokenizer)")


def train_bpe(texts: Iterable[str], out_path: str | Path, vocab_size: int = 8192, length: int | None = None) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_path` (atomically: see files.atomic_write).

    Ids 0 and 1 are `<|endoftext|>` and `<|pad|>`, matching the original tokenizer's layout, so shards made with
    either follow the same conventions. The byte-level alphabet is always included, so any text encodes.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_NAMES[0], PAD_NAMES[0]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer, length=length)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_path, lambda f: f.write(backend.to_str(pretty=True).encode()))
