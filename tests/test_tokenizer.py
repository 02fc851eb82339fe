"""Tokenizer loading, the original pile tokenizer's round trip, vocab padding and the fit check."""

import os
from pathlib import Path

import pytest

from tachyon.errors import TachyonError
from tachyon.tokenizer import check_fits, check_same_tokenizer, load_tokenizer, padded_vocab_size, train_bpe

PILE_ENV = "TACHYON_PILE_TOKENIZER"  # path of the original pile_tokenizer.json, which is not in the repository
PILE = Path(os.environ[PILE_ENV]).expanduser() if os.environ.get(PILE_ENV) else None
SAMPLE = (
    "The quick brown fox jumps over the lazy dog.\n\n"
    "def f(x):\n\treturn x ** 2  # squares\n"
    "Ünïcödé, 日本語, emoji 🙂 and  double  spaces, trailing space \n"
    "<html><body>tags &amp; entities</body></html>\r\n"
)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    return train_bpe([SAMPLE * 3, "hello world " * 50], path, vocab_size=400)


@pytest.mark.skipif(PILE is None, reason=f"set {PILE_ENV} to the original pile_tokenizer.json to run this test")
def test_original_tokenizer_round_trips_and_has_its_special_ids() -> None:
    tok = load_tokenizer(PILE)
    assert (tok.vocab_size, tok.eot_id, tok.pad_id) == (50000, 0, 1)
    assert len(tok.sha256) == 64
    texts = [SAMPLE, "", " leading space", "a" * 1000, Path(__file__).read_text(encoding="utf-8")]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert max(max(ids, default=0) for ids in tok.encode_batch(texts)) < tok.vocab_size


def test_trained_tokenizer_layout_and_round_trip(small_tokenizer: Path) -> None:
    tok = load_tokenizer(small_tokenizer)
    assert (tok.eot_id, tok.pad_id) == (0, 1)
    assert tok.vocab_size <= 400
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE  # byte-level: even unseen characters round-trip
    assert tok.decode(tok.encode("never seen: ẞ ∮ 𝔘")) == "never seen: ẞ ∮ 𝔘"
    assert 0 not in tok.encode(SAMPLE)  # encode adds no special tokens; callers join documents with eot_id


def test_missing_and_unparseable_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TachyonError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"this is": "not a tokenizer"', encoding="utf-8")
    with pytest.raises(TachyonError, match=r"bad\.json does not parse"):
        load_tokenizer(bad)


def test_padded_vocab_size() -> None:
    assert [padded_vocab_size(n) for n in (1, 64, 65, 8192, 50000)] == [64, 64, 128, 8192, 50048]
    assert padded_vocab_size(100, multiple=128) == 128


def test_check_fits(small_tokenizer: Path) -> None:
    tok = load_tokenizer(small_tokenizer)
    check_fits(tok, tok.vocab_size)
    with pytest.raises(TachyonError, match=f"has {tok.vocab_size} tokens but the model's vocab_size is 10"):
        check_fits(tok, 10)


def test_a_tokenizer_without_a_pad_token_has_pad_id_none(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator([SAMPLE], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                              show_progress=False))
    backend.save(str(tmp_path / "nopad.json"))
    tok = load_tokenizer(tmp_path / "nopad.json")
    assert (tok.eot_id, tok.pad_id, tok.fill_id) == (0, None, 0)  # end-of-text is never treated as padding


def test_a_literal_special_token_in_text_is_encoded_as_text(small_tokenizer: Path) -> None:
    tok = load_tokenizer(small_tokenizer)
    text = "end <|endoftext|> pad <|pad|> here"
    ids = tok.encode(text)
    assert tok.eot_id not in ids and tok.pad_id not in ids and tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]


def test_check_same_tokenizer_refuses_another_unless_named_explicitly(small_tokenizer: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    tok = load_tokenizer(small_tokenizer)
    check_same_tokenizer(tok.sha256, tok, "checkpoint x", explicit=False)
    check_same_tokenizer(None, tok, "checkpoint x", explicit=False)  # nothing recorded: nothing to compare
    with pytest.raises(TachyonError, match="checkpoint x was trained with the tokenizer of sha256 000000000000"):
        check_same_tokenizer("0" * 64, tok, "checkpoint x", explicit=False)
    check_same_tokenizer("0" * 64, tok, "checkpoint x", explicit=True)
    assert capsys.readouterr().err.startswith("warning: checkpoint x was trained with the tokenizer of sha256 0000")
