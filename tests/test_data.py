"""The shard reader (order, resume, splits, memory), `prepare`, `download`, the embedded default and bad inputs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tachyon.data import (
    IGNORE_INDEX,
    BatchLoader,
    ShardWriter,
    default,
    embedded_default,
    find_shards,
    parse_shard_range,
)
from tachyon.data.cli import main
from tachyon.data.prepare import PROGRESS, prepare
from tachyon.errors import TachyonError
from tachyon.tokenizer import Tokenizer, load_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
TEXT = "The Tachyon reader packs documents into rows. Each row is a window of tokens; pads fill the end.\n"


def write_shards(folder: Path, shapes: list[tuple[int, int]], dtype=np.int32, vocab: int = 1000) -> list[Path]:
    """Shards whose ids encode where they came from (shard, row, column), so batches can be traced back."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (rows, width) in enumerate(shapes):
        ids = (np.arange(rows * width).reshape(rows, width) + 7919 * i) % (vocab - 2) + 2
        paths.append(folder / f"shard_{i:05d}.npy")
        np.save(paths[-1], ids.astype(dtype))
    return paths


def take(loader: BatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path / "shards", [(40, 64), (25, 64), (31, 64)])
    return tmp_path / "shards"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe([TEXT * 20, "hello world, small corpus " * 40], tmp_path_factory.mktemp("tok") / "tok.json",
                     vocab_size=300)


# ------------------------------------------------------------------------------------------------ reader


def test_batches_are_shifted_windows_with_ignored_pads_and_last_position(tmp_path: Path) -> None:
    row = np.array([[5, 6, 0, 7, 8, 9, 1, 1]], dtype=np.int32)  # doc, eot, doc, pad pad
    np.save(tmp_path / "shard_00000.npy", row)
    loader = BatchLoader(tmp_path, batch_size=1, seq_len=8, vocab_size=16)
    x, y = next(loader)
    assert x.dtype == y.dtype == torch.int64 and x.shape == (1, 8)
    assert x.tolist() == [[5, 6, 0, 7, 8, 9, 1, 1]]
    assert y.tolist() == [[6, 0, 7, 8, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_wide_rows_are_cut_into_windows_and_one_epoch_covers_every_window_once(tmp_path: Path) -> None:
    write_shards(tmp_path, [(6, 40), (5, 40)], dtype=np.uint16)  # 40 wide, seq_len 16: 2 windows per row, 8 left
    loader = BatchLoader(tmp_path, batch_size=2, seq_len=16)
    assert loader.num_items == 11 * 2 and loader.tokens_per_batch == 32
    arrays = [np.load(p) for p in sorted(tmp_path.glob("shard_*.npy"))]
    expected = {tuple(a[r, w * 16:(w + 1) * 16]) for a in arrays for r in range(a.shape[0]) for w in range(2)}
    seen = [tuple(row) for x, _ in take(loader, 11) for row in x.tolist()]
    assert len(seen) == 22 and set(seen) == expected
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_same_seed_same_batches_for_any_num_workers(shard_dir: Path) -> None:
    runs = []
    for workers in (0, 1, 3):
        with BatchLoader(shard_dir, batch_size=5, seq_len=32, seed=3, num_workers=workers, vocab_size=1000) as loader:
            runs.append(take(loader, 60))  # 60 * 5 > 192 windows: crosses epoch boundaries too
    assert same(runs[0], runs[1]) and same(runs[0], runs[2])
    with BatchLoader(shard_dir, batch_size=5, seq_len=32, seed=4) as other:
        assert not same(runs[0], take(other, 60))


def test_epochs_are_reshuffled(shard_dir: Path) -> None:
    loader = BatchLoader(shard_dir, batch_size=96, seq_len=64)  # exactly one epoch per batch
    first, second = next(loader)[0], next(loader)[0]
    assert not torch.equal(first, second)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_batches_as_an_uninterrupted_run(shard_dir: Path, workers: int) -> None:
    with BatchLoader(shard_dir, batch_size=7, seq_len=64, num_workers=workers) as loader:
        uninterrupted = take(loader, 40)
    with BatchLoader(shard_dir, batch_size=7, seq_len=64, num_workers=workers) as loader:
        head = take(loader, 17)
        state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
    with BatchLoader(shard_dir, batch_size=7, seq_len=64, num_workers=2 - workers) as resumed:
        resumed.load_state_dict(state)
        tail = take(resumed, 23)
    assert same(head + tail, uninterrupted)


def test_load_state_dict_refuses_a_position_from_other_data(shard_dir: Path) -> None:
    state = BatchLoader(shard_dir, batch_size=2, seq_len=64).state_dict()
    with pytest.raises(TachyonError, match="saved data position is for 96 windows of 64"):
        BatchLoader(shard_dir, batch_size=2, seq_len=32).load_state_dict(state)


@pytest.mark.parametrize("how", [{"val_fraction": 0.1}, {"val_shards": 1}])
def test_val_and_train_are_disjoint_and_cover_the_data(shard_dir: Path, how: dict) -> None:
    train = BatchLoader(shard_dir, batch_size=4, seq_len=32, split="train", **how)
    val = BatchLoader(shard_dir, batch_size=4, seq_len=32, split="val", seed=99, **how)
    assert set(train.items.tolist()).isdisjoint(val.items.tolist())
    assert len(train.items) + len(val.items) == 2 * (40 + 25 + 31) and len(val.items) > 0
    rows_of = lambda loader, n: {tuple(r) for x, _ in take(loader, n) for r in x.tolist()}  # noqa: E731
    assert rows_of(train, len(train.items) // 4).isdisjoint(rows_of(val, len(val.items) // 4))
    if "val_shards" in how:
        assert len(val.items) == 2 * 31  # exactly the last shard


def test_empty_val_split_is_an_error(shard_dir: Path) -> None:
    with pytest.raises(TachyonError, match="validation split .* is empty"):
        BatchLoader(shard_dir, batch_size=4, seq_len=32, split="val")
    with pytest.raises(TachyonError, match="validation split .* is empty"):
        BatchLoader(shard_dir, batch_size=4, seq_len=32, split="val", val_fraction=0.001)
    with pytest.raises(TachyonError, match="leaves no training shards"):
        BatchLoader(shard_dir, batch_size=4, seq_len=32, split="train", val_shards=3)


def test_token_ids_at_or_above_vocab_size_name_the_id_vocab_and_file(tmp_path: Path) -> None:
    write_shards(tmp_path, [(4, 16)], vocab=1000)
    bad = np.full((4, 16), 3, dtype=np.int32)
    bad[2, 5] = 50257
    np.save(tmp_path / "shard_00001.npy", bad)
    loader = BatchLoader(tmp_path, batch_size=8, seq_len=16, vocab_size=8192, num_workers=2)
    with pytest.raises(TachyonError, match=r"shard_00001\.npy holds token id 50257 but the model's vocab_size is 8192"):
        next(loader)
    loader.close()


MEMORY_PROBE = textwrap.dedent("""
    import json, re, resource, sys
    import numpy as np
    from tachyon.data import BatchLoader

    def peak():
        # Peak RSS in MB. ru_maxrss is also reported, but a child started by fork + exec inherits the parent's
        # peak in it (here pytest's, several hundred MB), which would hide any growth; VmHWM is this process's own.
        hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())
        return int(hwm.group(1)) / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    loader = BatchLoader(sys.argv[1], batch_size=8, seq_len=1024, vocab_size=50000, num_workers=2)
    next(loader)
    before = peak()
    for _ in range(50):
        next(loader)
    after = peak()
    np.load(sys.argv[1] + "/shard_00000.npy").sum()  # control: loading it whole does show up
    print(json.dumps({"before": before, "after": after, "whole": peak()}))
""")


def test_the_data_package_imports_neither_the_model_nor_triton() -> None:
    """Preparing data on a machine without a GPU stack must not pay for (or break on) the model's kernels."""
    probe = ("import sys, tachyon.data, tachyon.data.cli; "
             "print(sorted(m for m in ('triton', 'kernels', 'tachyon.model') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_reading_a_256mb_shard_keeps_memory_flat(tmp_path: Path) -> None:
    shard = np.lib.format.open_memmap(tmp_path / "shard_00000.npy", mode="w+", dtype=np.int32, shape=(32768, 2048))
    for start in range(0, 32768, 4096):
        shard[start:start + 4096] = (np.arange(4096 * 2048, dtype=np.int32).reshape(4096, 2048) + start) % 49999
    shard.flush()
    del shard
    assert (tmp_path / "shard_00000.npy").stat().st_size >= 256 * 2**20
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                         check=True, timeout=120)
    mb = {k: v[0] for k, v in json.loads(out.stdout).items()}
    assert mb["after"] - mb["before"] < 50, out.stdout  # 50 batches of 8 x 1024 tokens: well under 100 MB
    assert mb["whole"] - mb["after"] > 200, out.stdout  # the probe does see a whole-shard load


# ------------------------------------------------------------------------------------------------ bad shards


def test_missing_and_empty_data_dirs_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(TachyonError, match=r"does not exist; pass --data-dir with a folder of shard_\*\.npy"):
        BatchLoader(tmp_path / "nope", batch_size=1, seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TachyonError, match=r"has no shard_\*\.npy files"):
        BatchLoader(tmp_path / "empty", batch_size=1, seq_len=8)


@pytest.mark.parametrize("array, message", [
    (np.arange(100, dtype=np.int32), r"shard_00000\.npy is 1-D"),
    (np.zeros((4, 16), dtype=np.float32), r"shard_00000\.npy holds float32 values, not token ids"),
])
def test_shards_must_be_2d_integer_arrays(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "shard_00000.npy", array)
    with pytest.raises(TachyonError, match=message):
        BatchLoader(tmp_path, batch_size=1, seq_len=8)


def test_truncated_and_corrupt_shards_are_named(tmp_path: Path) -> None:
    (path,) = write_shards(tmp_path, [(64, 64)])
    path.write_bytes(path.read_bytes()[: 2000])
    with pytest.raises(TachyonError, match=r"shard .*shard_00000\.npy is truncated or not a valid \.npy"):
        BatchLoader(tmp_path, batch_size=1, seq_len=8)
    path.write_bytes(b"not numpy at all" * 10)
    with pytest.raises(TachyonError, match=r"shard_00000\.npy is truncated or not a valid \.npy"):
        BatchLoader(tmp_path, batch_size=1, seq_len=8)


def test_mismatched_widths_and_too_long_seq_len(tmp_path: Path) -> None:
    write_shards(tmp_path / "a", [(4, 64), (4, 64), (4, 32)])
    with pytest.raises(TachyonError, match=r"different widths \(\[32, 64\]\).*shard_00002\.npy"):
        BatchLoader(tmp_path / "a", batch_size=1, seq_len=8)
    write_shards(tmp_path / "b", [(4, 64)])
    with pytest.raises(TachyonError, match="seq-len 128 is longer than the shard rows"):
        BatchLoader(tmp_path / "b", batch_size=1, seq_len=128)


# ------------------------------------------------------------------------------------------------ prepare


def make_corpus(root: Path) -> list[str]:
    """A folder of .txt/.md/.jsonl files (and a file prepare must ignore); returns the documents in prepare's order."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(TEXT * 3, encoding="utf-8")
    (root / "b.md").write_text("# Title\n\nSome *markdown* text.\n", encoding="utf-8")
    lines = [json.dumps({"text": f"record {i}: {TEXT}", "id": i}) for i in range(30)]
    lines.insert(3, json.dumps({"other": "no text field"}))
    (root / "sub" / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    return [TEXT * 3, "# Title\n\nSome *markdown* text.\n"] + [f"record {i}: {TEXT}" for i in range(30)]


def test_prepare_packs_documents_into_shards_that_decode_back(tmp_path: Path, tokenizer_path: Path) -> None:
    docs = make_corpus(tmp_path / "text")
    meta = prepare(tokenizer_path, [tmp_path / "text"], tmp_path / "out", seq_len=32, shard_rows=8, log=lambda s: None)
    tok = load_tokenizer(tokenizer_path)
    shards = find_shards(tmp_path / "out")
    arrays = [np.load(p) for p in shards]
    assert len(shards) == meta["num_shards"] > 2 and all(a.dtype == np.int32 and a.shape[1] == 32 for a in arrays)
    assert all(a.shape[0] == 8 for a in arrays[:-1])
    flat = np.concatenate([a.ravel() for a in arrays])
    assert meta["num_tokens"] == int((flat != tok.pad_id).sum()) and meta["num_documents"] == len(docs)
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["dtype"] == "int32"
    body = flat[: meta["num_tokens"]]
    assert (flat[meta["num_tokens"]:] == tok.pad_id).all() and body[-1] == tok.eot_id
    decoded = tok.decode([int(t) for t in body]).split("<|endoftext|>")
    assert decoded[:-1] == docs and decoded[-1] == ""
    loader = BatchLoader(tmp_path / "out", batch_size=4, seq_len=32, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    x, y = next(loader)
    assert x.shape == (4, 32) and int(x.max()) < tok.vocab_size


def interrupt_at_shard(monkeypatch: pytest.MonkeyPatch, stop: int, written: bool) -> None:
    """Make `prepare` stop as a kill would: before shard `stop` is written, or just after it (before it is recorded)."""
    write = ShardWriter._write

    def interrupted(self: ShardWriter, rows: np.ndarray) -> None:
        if self.n_shards == stop and not written:
            raise KeyboardInterrupt
        write(self, rows)
        if self.n_shards == stop + 1 and written:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "_write", interrupted)


def record_encoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text the tokenizer encodes from now on, in order."""
    encoded: list[str] = []
    encode, encode_batch = Tokenizer.encode, Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: encoded.append(text) or encode(self, text))
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, texts: encoded.extend(texts) or encode_batch(self, texts))
    return encoded


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("seq_len, shard_rows, batch_chars, written", [
    (32, 4, 1, False),  # one document per encode call; stopped before a shard is written
    (32, 4, 4_000_000, True),  # all documents in one call; stopped after a shard is written, before it is recorded
    (16, 2, 4_000_000, False),  # the first document fills 5 shards alone and leaves tokens over for the next
])
def test_an_interrupted_prepare_resumes_without_re_tokenizing_and_matches_an_uninterrupted_run(
        tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch, seq_len: int, shard_rows: int,
        batch_chars: int, written: bool) -> None:
    docs = make_corpus(tmp_path / "text")
    args = dict(tokenizer=tokenizer_path, inputs=[tmp_path / "text"], seq_len=seq_len, shard_rows=shard_rows,
                batch_chars=batch_chars, log=lambda s: None)
    whole = prepare(**args, out=tmp_path / "whole")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at_shard(m, stop=5, written=written)
        with pytest.raises(KeyboardInterrupt):
            prepare(**args, out=out)
    assert not (out / "meta.json").exists() and (out / PROGRESS).is_file()
    assert len(find_shards(out)) == 5 + written

    tok = load_tokenizer(tokenizer_path)
    ends = np.cumsum([len(tok.encode(d)) + 1 for d in docs])
    finished = int(np.searchsorted(ends, 5 * seq_len * shard_rows)) + 1  # up to the one that completed shard 4
    encoded = record_encoded(monkeypatch)
    logs: list[str] = []
    meta = prepare(**{**args, "log": logs.append}, out=out)
    assert encoded[:len(docs) - finished] == docs[finished:] and len(encoded) == len(docs) - finished
    assert "resuming an unfinished run at shard 5" in logs[1] and "(5 of them before the restart)" in logs[-1]
    assert meta == whole and contents(out) == contents(tmp_path / "whole")  # no progress or temp files left either


def test_a_restart_with_other_arguments_is_refused_and_one_with_changed_inputs_starts_over(
        tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_corpus(tmp_path / "text")
    out = tmp_path / "out"
    args = dict(tokenizer=tokenizer_path, inputs=[tmp_path / "text"], out=out, seq_len=32, shard_rows=4,
                log=lambda s: None)
    with monkeypatch.context() as m:
        interrupt_at_shard(m, stop=5, written=False)
        with pytest.raises(KeyboardInterrupt):
            prepare(**args)
    left = contents(out)
    for change, message in [({"seq_len": 64}, "seq_len 32 then, 64 now"),
                            ({"inputs": [tmp_path / "text" / "a.txt"]}, "inputs ")]:
        with pytest.raises(TachyonError, match=rf"{out} holds an unfinished prepare with other arguments "
                                               rf"\({message}.*repeat the earlier command"):
            prepare(**{**args, **change})
    assert contents(out) == left  # refused before touching anything

    with (tmp_path / "text" / "sub" / "c.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more record"}) + "\n")
    logs: list[str] = []
    meta = prepare(**{**args, "log": logs.append})
    assert logs[0] == f"starting over in {out}: the inputs changed since the unfinished run " \
                      f"({(tmp_path / 'text' / 'sub' / 'c.jsonl').resolve()} changed size or modification time)"
    assert meta == prepare(**{**args, "out": tmp_path / "fresh"}) and contents(out) == contents(tmp_path / "fresh")

    assert prepare(**args) == meta and contents(out) == contents(tmp_path / "fresh")  # a finished set is rebuilt
    with pytest.raises(TachyonError, match="already holds shards from another tokenizer or seq_len"):
        prepare(**{**args, "seq_len": 64})
    write_shards(tmp_path / "other", [(4, 32)])
    with pytest.raises(TachyonError, match="holds shard_\\*.npy files that no unfinished prepare recorded"):
        prepare(**{**args, "out": tmp_path / "other"})


def test_prepare_bad_inputs(tmp_path: Path, tokenizer_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "bad_tok.json").write_text("{}", encoding="utf-8")
    cases = [
        (["--input", str(tmp_path / "empty.txt")], "hold no text"),
        (["--input", str(tmp_path / "nofield.jsonl")], 'no text found in the inputs (.jsonl lines need a "text"'),
        (["--input", str(tmp_path / "broken.jsonl")], "broken.jsonl:2 is not valid JSON"),
        (["--input", str(tmp_path / "missing")], "missing does not exist"),
        (["--input", str(tmp_path / "bad_tok.json")], "is not a .txt/.md/.jsonl file"),
        (["--input", str(tmp_path / "empty.txt"), "--tokenizer", str(tmp_path / "bad_tok.json")], "does not parse"),
    ]
    for extra, message in cases:
        argv = ["prepare", "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "out"), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()  # the progress bar may come first, then exactly one error line
        assert err[-1].startswith("error: ") and message in err[-1] and sum("error" in e for e in err) == 1, err
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").glob("shard_*"))


def test_cli_user_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "tachyon.data", "prepare", "--tokenizer", str(tmp_path / "t.json"),
                          "--input", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: tokenizer file") and out.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------ download


class FakeFile:
    def __init__(self, path: str, size: int):
        self.path, self.size = path, size


def fake_hub(monkeypatch: pytest.MonkeyPatch, available: int, calls: list) -> None:
    """Stand-ins for HfApi().get_paths_info and snapshot_download that lay files out as the hub does."""
    import huggingface_hub

    class FakeApi:
        def get_paths_info(self, repo_id, paths, **kwargs):
            calls.append(("get_paths_info", repo_id, list(paths), kwargs))
            return [FakeFile(p, 82_000_000) for p in paths if int(p[6:11]) < available]

    def fake_snapshot_download(**kwargs):
        calls.append(("snapshot_download", kwargs))
        out = Path(kwargs["local_dir"])
        (out / ".cache" / "huggingface" / "download").mkdir(parents=True, exist_ok=True)
        for name in kwargs["allow_patterns"]:
            write_shards(out / "tmp", [(3, 64)])
            os.replace(out / "tmp" / "shard_00000.npy", out / name)
            (out / ".cache" / "huggingface" / "download" / f"{name}.metadata").write_text("x\n", encoding="utf-8")
        return str(out)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)


def test_download_asks_for_exactly_the_named_shards(tmp_path: Path, monkeypatch, capsys) -> None:
    calls: list = []
    fake_hub(monkeypatch, available=2685, calls=calls)
    argv = ["download", "--repo", "SuperGoatScriptGuy/PreprocessedMIXED", "--shards", "0-2,7", "--out",
            str(tmp_path / "data")]
    assert main(argv) == 0
    names = ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy", "shard_00007.npy"]
    assert calls[0] == ("get_paths_info", "SuperGoatScriptGuy/PreprocessedMIXED", names, {"repo_type": "dataset"})
    assert calls[1] == ("snapshot_download", {"repo_id": "SuperGoatScriptGuy/PreprocessedMIXED",
                                              "repo_type": "dataset", "allow_patterns": names,
                                              "local_dir": str(tmp_path / "data")})
    assert "4 shards, 0.33 GB in all" in capsys.readouterr().out  # the size comes before the download
    loader = BatchLoader(tmp_path / "data", batch_size=2, seq_len=64)  # the hub's local_dir layout reads as is
    assert [p.name for p in loader.paths] == names and next(loader)[0].shape == (2, 64)


def test_download_of_shards_the_repo_lacks_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    calls: list = []
    fake_hub(monkeypatch, available=50, calls=calls)
    assert main(["download", "--shards", "45-60", "--out", str(tmp_path / "data")]) == 2
    assert "has no shard_00050.npy (and 10 more)" in capsys.readouterr().err
    assert [c[0] for c in calls] == ["get_paths_info"] and not (tmp_path / "data").exists()


def test_hub_cache_layout_is_found_one_level_down(tmp_path: Path) -> None:
    write_shards(tmp_path / "datasets--x--y" / "snapshots" / "abc123", [(3, 16), (3, 16)])
    assert [p.name for p in find_shards(tmp_path / "datasets--x--y")] == ["shard_00000.npy", "shard_00001.npy"]
    write_shards(tmp_path / "datasets--x--y" / "snapshots" / "def456", [(3, 16)])
    with pytest.raises(TachyonError, match="in several folders"):
        find_shards(tmp_path / "datasets--x--y")


def test_parse_shard_range() -> None:
    assert parse_shard_range("0-3") == [0, 1, 2, 3]
    assert parse_shard_range("5, 1,2-3") == [1, 2, 3, 5]
    for bad in ("", "a-b", "3-1", "1-2-3"):
        with pytest.raises(TachyonError, match="is not a range"):
            parse_shard_range(bad)


# ------------------------------------------------------------------------------------------------ embedded default


def test_embedded_default_builds_once_then_comes_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TACHYON_CACHE", str(tmp_path / "cache"))
    logs: list[str] = []
    shard_dir, tok_path = embedded_default(seq_len=64, log=logs.append, max_mb=0.3)
    assert shard_dir.parent == tmp_path / "cache" / "default" and tok_path.parent == tmp_path / "cache" / "default"
    assert any(m.startswith("building corpus from") for m in logs) and "training tokenizer" in " ".join(logs)
    assert any(m.startswith("writing shards") for m in logs)
    tok = load_tokenizer(tok_path)
    assert (tok.eot_id, tok.pad_id) == (0, 1) and 1000 < tok.vocab_size <= 8192
    assert tok.decode(tok.encode("def main() -> None:\n    pass\n")) == "def main() -> None:\n    pass\n"
    loader = BatchLoader(shard_dir, batch_size=4, seq_len=64, vocab_size=tok.vocab_size)
    assert loader.num_items > 100 and next(loader)[0].shape == (4, 64)
    stamp = tok_path.stat().st_mtime_ns, sorted(p.stat().st_mtime_ns for p in shard_dir.iterdir())

    logs.clear()
    assert embedded_default(seq_len=64, log=logs.append, max_mb=0.3) == (shard_dir, tok_path)
    assert logs == [f"using the cached embedded default corpus in {tmp_path / 'cache' / 'default'}"]
    assert stamp == (tok_path.stat().st_mtime_ns, sorted(p.stat().st_mtime_ns for p in shard_dir.iterdir()))

    logs.clear()  # another width reuses the tokenizer
    other, _ = embedded_default(seq_len=32, log=logs.append, max_mb=0.3)
    assert other != shard_dir and not any("training tokenizer" in m for m in logs)
    assert tok_path.stat().st_mtime_ns == stamp[0]

    (shard_dir / "meta.json").unlink()  # an interrupted shard build is redone
    logs.clear()
    embedded_default(seq_len=64, log=logs.append, max_mb=0.3)
    assert any(m.startswith("writing shards") for m in logs) and (shard_dir / "meta.json").is_file()

    monkeypatch.setattr(default, "DEFAULT_VERSION", "test-stale")  # a new recipe rebuilds everything
    logs.clear()
    embedded_default(seq_len=64, log=logs.append, max_mb=0.3)
    assert any("training tokenizer" in m for m in logs) and not other.exists()


def test_a_rebuilt_embedded_tokenizer_never_replaces_one_a_checkpoint_points_to(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TACHYON_CACHE", str(tmp_path / "cache"))
    _, first = embedded_default(seq_len=64, log=lambda m: None, max_mb=0.2)
    assert first.name == f"tokenizer-{load_tokenizer(first).sha256[:16]}.json"  # named by its content
    before = first.read_bytes()
    _, second = embedded_default(seq_len=64, log=lambda m: None, max_mb=0.3)  # e.g. TACHYON_DEFAULT_MB changed
    assert second != first and first.read_bytes() == before


def test_embedded_corpus_is_deterministic_and_capped() -> None:
    a, n = default._stdlib_documents(200_000)
    b, _ = default._stdlib_documents(200_000)
    assert a == b and n >= 2 and sum(len(d.encode()) for d in a) <= 200_000


def test_without_a_pad_token_nothing_is_masked_and_the_partial_last_row_is_dropped(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, seq_len=4, shard_rows=100, eot_id=0, pad_id=None)
    for doc in ([5, 6, 7], [8, 9], [1, 2]):  # 4 + 3 + 3 tokens with their end-of-texts
        writer.add(doc)
    meta = writer.finish({})
    assert meta["pad_id"] is None and meta["num_tokens"] == 8
    assert np.load(tmp_path / "shard_00000.npy").tolist() == [[5, 6, 7, 0], [8, 9, 0, 1]]
    loader = BatchLoader(tmp_path, batch_size=2, seq_len=4, vocab_size=16, pad_id=None, seed=0)
    _, y = next(loader)
    assert (y == 1).any() and (y == 0).sum() == 2  # id 1 is an ordinary token here, end-of-text is scored


# ------------------------------------------------------------------------------------------------ faithful text


def _documents_in(out: Path, tok: Tokenizer) -> list[str]:
    """The documents of a prepared folder, decoded: rows joined, pads dropped, split at end-of-text ids."""
    ids = np.concatenate([np.load(p).ravel() for p in sorted(out.glob("shard_*.npy"))])
    ids = ids[ids != tok.pad_id].tolist()
    docs, start = [], 0
    for i, token in enumerate(ids):
        if token == tok.eot_id:
            docs.append(tok.decode(ids[start:i]))
            start = i + 1
    return docs


def test_prepare_keeps_the_text_as_written_and_reports_what_it_replaced_or_skipped(
        tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    (tmp_path / "b.txt").write_bytes("ok \ufffd real, ".encode() + b"bad \xff and \xfe\xfe here")
    records = [{"text": "a literal <|endoftext|> is text"}, {"body": "no text field"}, {"text": 5}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    logs: list[str] = []
    meta = prepare(tokenizer_path, [tmp_path / n for n in ("a.txt", "b.txt", "c.jsonl")], tmp_path / "out",
                   seq_len=16, shard_rows=4, log=logs.append)
    tok = load_tokenizer(tokenizer_path)
    assert _documents_in(tmp_path / "out", tok) == ["line one\r\nline two\r\n",
                                                    "ok \ufffd real, bad \ufffd and \ufffd\ufffd here",
                                                    "a literal <|endoftext|> is text"]
    assert (meta["num_documents"], meta["utf8_replacements"], meta["records_without_text"]) == (3, 3, 2)
    assert any("3 invalid UTF-8" in m for m in logs) and any('2 .jsonl record(s) without a "text"' in m for m in logs)


def test_prepare_out_naming_a_file_is_one_line(tmp_path: Path, tokenizer_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in.txt").write_text(TEXT)
    (tmp_path / "taken").write_text("a file")
    argv = ["prepare", "--tokenizer", str(tokenizer_path), "--input", str(tmp_path / "in.txt"), "--out",
            str(tmp_path / "taken")]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'taken'} is a file; pass a folder (new or empty) " \
                                      "for the shards\n"


def test_a_data_dir_naming_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "shard_00000.npy").write_bytes(b"")
    with pytest.raises(TachyonError, match="is a file, not a folder"):
        find_shards(tmp_path / "shard_00000.npy")


# ------------------------------------------------------------------------------------------------ check


def test_check_finds_an_out_of_range_id_no_batch_would_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_shards(tmp_path, [(40, 64), (25, 64)], vocab=1000)
    assert main(["check", str(tmp_path), "--vocab-size", "1000"]) == 0
    assert capsys.readouterr().out == f"{tmp_path}: 2 shards, all sound: ids in [0, 1000)\n"
    bad = np.load(tmp_path / "shard_00001.npy")
    bad[23, 5] = 1000
    np.save(tmp_path / "shard_00001.npy", bad)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 1000}))  # the vocab comes from meta.json
    assert main(["check", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: shard {tmp_path / 'shard_00001.npy'} holds token id 1000 at row 23, "
                                       "column 5: outside [0, 1000), the vocab size\n")


def test_check_lists_every_damaged_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_shards(tmp_path, [(4, 8), (4, 16), (4, 8)])
    np.save(tmp_path / "shard_00002.npy", np.zeros((4, 8), dtype=np.float32))
    assert main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "shard_00002.npy holds float32" in err[0] and "different widths ([8, 16])" in err[1]
