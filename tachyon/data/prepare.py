"""`prepare`: tokenize .txt/.md/.jsonl files into shards; an interrupted run resumes without re-tokenizing.

    python -m tachyon.data prepare --tokenizer T --input PATH... --out DIR --seq-len 2048

Documents come in a fixed order (the --input arguments in turn, each folder's files sorted, each file's lines in
order), so a place in the input is a `Position`. After every document that completes a shard, `PROGRESS` in the
output folder records, atomically: the shards done, the position just after that document, the tokens of it left
over for the next shard, and what the run depends on (its arguments; each input file's size and mtime). Running the
same command again resumes there, seeking past the finished input instead of tokenizing it, and writes the shards
an uninterrupted run would have. A rerun with other arguments is refused while finished shards would be lost; one
whose input files changed since starts over. `meta.json` comes last, then the progress file is removed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import TachyonError
from ..files import atomic_write
from ..tokenizer import load_tokenizer
from .shards import SHARD_GLOB, ShardWriter, open_shard, shard_name

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
PROGRESS = ".prepare_progress.npz"  # in the output folder while a run is unfinished
TEMP_GLOBS = (f".{SHARD_GLOB}.tmp*", ".meta.json.tmp*", f".{PROGRESS}.tmp*")  # what a killed atomic write leaves


class Position(NamedTuple):
    """A place in the document stream: input file index, bytes of that file consumed, lines of it consumed."""

    file: int
    offset: int = 0
    line: int = 0  # for `file:line` in error messages, also after a resume


def _text_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The input files in document order: each argument in turn, a folder's .txt/.md/.jsonl files sorted."""
    files = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise TachyonError(f"input folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise TachyonError(f"input {path} is not a {'/'.join(TEXT_SUFFIXES)} file")
            files.append(path)
        else:
            raise TachyonError(f"input {path} does not exist; pass --input with text files or folders")
    return files


class Doc(NamedTuple):
    """One item of the document stream: its text (None for a .jsonl record without the text field), how many
    invalid UTF-8 sequences were replaced in it, and the position just after it."""

    text: str | None
    replaced: int
    end: Position


def decode_counting(raw: bytes) -> tuple[str, int]:
    """UTF-8 text of `raw` exactly as written (no newline translation) and the number of invalid sequences that
    became U+FFFD (a U+FFFD already in the input is not counted)."""
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _documents(path: Path, text_field: str, offset: int = 0,
               line: int = 0) -> Iterator[tuple[str | None, int, int, int]]:
    """The documents of one file from byte `offset` (after `line` lines) on: (text, replaced, offset, line) after it.

    A .txt/.md file is one document, read whole as bytes (so `\r\n` stays `\r\n`); any offset past 0 means it is
    done. A .jsonl file gives one per line's `text_field`, or None for a record without it (it is counted, not
    trained on); it is read as bytes so that a resume can seek straight to a line.
    """
    if path.suffix != ".jsonl":
        if offset == 0:
            raw = path.read_bytes()
            yield *decode_counting(raw), len(raw), 0
        return
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            offset, line = offset + len(raw), line + 1
            text, replaced = decode_counting(raw)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TachyonError(f"{path}:{line} is not valid JSON ({exc.msg}); .jsonl files need one JSON object "
                                   "per line") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            yield (text if isinstance(text, str) else None), replaced, offset, line


def _document_stream(files: list[Path], text_field: str, start: Position) -> Iterator[Doc]:
    """Every document from `start` on, in order."""
    for index in range(start.file, len(files)):
        offset, line = (start.offset, start.line) if index == start.file else (0, 0)
        for text, replaced, offset_after, line_after in _documents(files[index], text_field, offset, line):
            yield Doc(text, replaced, Position(index, offset_after, line_after))


def _batches(docs: Iterable[Doc], batch_chars: int) -> Iterator[list[Doc]]:
    """Documents in runs of about `batch_chars` characters: one parallel encode each."""
    batch: list[Doc] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text or "")
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _fingerprint(files: list[Path]) -> list[list]:
    """Each input file's resolved path, size and mtime: a resume checks that none changed since."""
    return [[str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns] for p in files]


def _changed_input(old: list[list], new: list[list]) -> str:
    """Which input file differs between two fingerprints, in words."""
    before, now = {p: rest for p, *rest in old}, {p: rest for p, *rest in new}
    for path in [*now, *before]:
        if path not in before:
            return f"{path} is new"
        if path not in now:
            return f"{path} is gone"
        if before[path] != now[path]:
            return f"{path} changed size or modification time"
    return "the order of the input files changed"


def _save_progress(out: Path, run: dict, writer: ShardWriter, position: Position, counts: dict) -> None:
    """Record atomically that `writer`'s shards are done and that the next document comes from `position`."""
    state = {**run, "shards": writer.n_shards, "tokens": writer.n_tokens, "documents": writer.n_docs,
             "position": list(position), "counts": counts}
    atomic_write(out / PROGRESS, lambda f: np.savez(f, state=np.array(json.dumps(state)), carry=writer.carry))


def _load_progress(out: Path) -> tuple[dict, np.ndarray] | None:
    """The state and left-over tokens an unfinished run recorded in `out`, or None when there is none."""
    path = out / PROGRESS
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            return json.loads(saved["state"].item()), saved["carry"]
    except Exception as exc:  # it is written atomically: only damage from outside gets here
        raise TachyonError(f"{path}, the progress of an unfinished prepare, is unreadable ({type(exc).__name__}); "
                           f"delete {out} or use another --out to start over") from None


def _damaged_shard(out: Path, count: int, writer: ShardWriter) -> str | None:
    """The first of the `count` finished shards that is missing or not the shape and dtype `writer` makes, if any."""
    for index in range(count):
        try:
            info = open_shard(out / shard_name(index))
        except TachyonError:
            return shard_name(index)
        if (info.rows, info.width, info.dtype) != (writer.shard_rows, writer.seq_len, writer.dtype):
            return shard_name(index)
    return None


def _why_not_resume(out: Path, state: dict, run: dict, writer: ShardWriter) -> str | None:
    """None when the unfinished run recorded in `state` can go on; else why this run must start over.

    Raises TachyonError when finished shards were made with other arguments: repeating the earlier command would
    still finish them, so they are not thrown away over what may be a typo.
    """
    old, new = state["settings"], run["settings"]
    if old != new:
        key = next(k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k))
        change = f"{key} {old.get(key)} then, {new.get(key)} now"
        if state["shards"]:
            raise TachyonError(f"{out} holds an unfinished prepare with other arguments ({change}); repeat the "
                               "earlier command to finish it, or use an empty --out")
        return f"other arguments ({change}) and no shard finished yet"
    if state["inputs"] != run["inputs"]:
        return f"the inputs changed since the unfinished run ({_changed_input(state['inputs'], run['inputs'])})"
    if damaged := _damaged_shard(out, state["shards"], writer):
        return f"{damaged} of the unfinished run is missing or damaged"
    return None


def _check_unrecorded_shards(out: Path, settings: dict) -> None:
    """Refuse an `out` whose shards no unfinished run recorded: a finished set of other settings, or anyone's."""
    meta = out / "meta.json"
    if meta.exists():
        old = json.loads(meta.read_text(encoding="utf-8"))
        if old.get("tokenizer_sha256") != settings["tokenizer_sha256"] or old.get("seq_len") != settings["seq_len"]:
            raise TachyonError(f"{out} already holds shards from another tokenizer or seq_len; use an empty --out")
    elif any(out.glob(SHARD_GLOB)):
        raise TachyonError(f"{out} holds {SHARD_GLOB} files that no unfinished prepare recorded and no meta.json; "
                           "use an empty --out, or delete them")


def _start(out: Path, run: dict, writer: ShardWriter, log: Callable[[str], None]) -> tuple[Position, dict]:
    """Where this run begins, and the text counts so far: where an unfinished run of the same command stopped
    (`writer` restored to it), else at the first document, with whatever an earlier run left in `out` removed so
    that nothing old mixes in."""
    for pattern in TEMP_GLOBS:
        for tmp in out.glob(pattern):
            tmp.unlink()
    saved = _load_progress(out)
    if saved is None:
        _check_unrecorded_shards(out, run["settings"])
    else:
        state, carry = saved
        if (why := _why_not_resume(out, state, run, writer)) is None:
            writer.restore(state["shards"], state["tokens"], state["documents"], carry)
            return Position(*state["position"]), {**_no_counts(), **state.get("counts", {})}
        log(f"starting over in {out}: {why}")
    out.mkdir(parents=True, exist_ok=True)
    counts = _no_counts()
    _save_progress(out, run, writer, Position(0), counts)  # first: `out` stays marked unfinished while cleared
    for path in [out / "meta.json", *out.glob(SHARD_GLOB)]:
        path.unlink(missing_ok=True)
    return Position(0), counts


def _no_counts() -> dict:
    """What prepare counts about its input besides tokens: replaced UTF-8 sequences and skipped .jsonl records."""
    return {"utf8_replacements": 0, "records_without_text": 0}


def _report_counts(counts: dict, text_field: str, log: Callable[[str], None]) -> None:
    """Say what was changed or left out of the input, so nothing is altered silently."""
    if counts["utf8_replacements"]:
        log(f"note: {counts['utf8_replacements']:,} invalid UTF-8 byte sequence(s) in the input were replaced with "
            "U+FFFD")
    if counts["records_without_text"]:
        log(f'note: {counts["records_without_text"]:,} .jsonl record(s) without a "{text_field}" string field were '
            "skipped (set --text-field to use another field)")


def prepare(tokenizer: str | Path, inputs: list[str | Path], out: str | Path, seq_len: int = 2048,
            shard_rows: int | None = None, text_field: str = "text", batch_chars: int = 4_000_000,
            log: Callable[[str], None] = print) -> dict:
    """Tokenize text files into shards: documents joined by end-of-text, packed into rows of `seq_len`.

    `shard_rows` defaults to about 20M tokens per shard, as in the original dataset. Encoding runs in batches
    through the tokenizer's parallel encoder. An interrupted run continues from its last finished shard when the
    same command is run again (see the module docstring), and the result is byte-identical to an uninterrupted run.
    """
    from tqdm import tqdm

    tok = load_tokenizer(tokenizer)
    files = _text_files(inputs)
    fingerprint = _fingerprint(files)
    before = np.cumsum([0] + [size for _, size, _ in fingerprint])  # bytes of input ahead of each file, for the bar
    total_bytes = int(before[-1])
    if total_bytes == 0:
        raise TachyonError(f"the inputs ({', '.join(str(p) for p in files[:3])}) hold no text; nothing to prepare")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TachyonError(f"--out {out} is a file; pass a folder (new or empty) for the shards")
    shard_rows = shard_rows or max(1, 20_000_000 // seq_len)
    settings = {"tokenizer_sha256": tok.sha256, "seq_len": seq_len, "shard_rows": shard_rows,
                "text_field": text_field, "inputs": [str(Path(p).expanduser().resolve()) for p in inputs]}
    run = {"settings": settings, "inputs": fingerprint}
    writer = ShardWriter(out, seq_len, shard_rows, tok.eot_id, tok.pad_id)
    start, counts = _start(out, run, writer, log)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete again until this run finishes

    def done(position: Position) -> int:
        """Bytes of input before `position`, for the progress bar."""
        return int(before[position.file]) + position.offset

    log(f"tokenizing {len(files)} files ({total_bytes / 1e6:.1f} MB) into {out} (seq_len {seq_len}, "
        f"{shard_rows} rows per shard)")
    resumed_at = writer.n_shards
    if resumed_at:
        log(f"resuming an unfinished run at shard {resumed_at}: {done(start) / 1e6:.1f} MB of input already done")
    with tqdm(total=total_bytes, initial=done(start), unit="B", unit_scale=True, desc="prepare") as bar:
        for batch in _batches(_document_stream(files, text_field, start), batch_chars):
            encoded = iter(tok.encode_batch([d.text for d in batch if d.text is not None]))  # one parallel call
            for doc in batch:
                counts["utf8_replacements"] += doc.replaced
                if doc.text is None:
                    counts["records_without_text"] += 1
                elif writer.add(next(encoded)):
                    _save_progress(out, run, writer, doc.end, counts)
            bar.update(done(batch[-1].end) - bar.n)
        bar.update(total_bytes - bar.n)
    _report_counts(counts, text_field, log)
    if writer.n_tokens == 0:
        hint = f' (.jsonl lines need a "{text_field}" string field; set --text-field)' if any(
            p.suffix == ".jsonl" for p in files) else ""
        (out / PROGRESS).unlink()
        raise TachyonError(f"no text found in the inputs{hint}; nothing to prepare")
    meta = writer.finish({"tokenizer": str(tok.path), "tokenizer_sha256": tok.sha256,
                          "vocab_size": tok.vocab_size, "sources": [str(p) for p in files], **counts})
    (out / PROGRESS).unlink()  # after meta.json: a kill in between resumes (and rewrites the tail) rather than mixes
    log(f"wrote {meta['num_shards']} shards" + (f" ({resumed_at} of them before the restart)" if resumed_at else "")
        + f", {meta['num_tokens']:,} tokens, to {out}")
    return meta
