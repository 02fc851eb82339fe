"""The `python -m tachyon.data` command line: prepare, check, download."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TachyonError, run_cli
from .check import run_check
from .hub import download
from .prepare import prepare


def build_parser() -> argparse.ArgumentParser:
    """The prepare, check and download sub-commands and their options."""
    parser = argparse.ArgumentParser(prog="python -m tachyon.data", description="Make, fetch and check shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt/.md/.jsonl files into shards")
    p.add_argument("--tokenizer", required=True, help="a tokenizers JSON file")
    p.add_argument("--input", required=True, nargs="+", help="text files or folders")
    p.add_argument("--out", required=True, help="folder for shard_*.npy and meta.json")
    p.add_argument("--seq-len", type=int, default=2048, help="row width in tokens (default 2048)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: about 20M tokens)")
    p.add_argument("--text-field", default="text", help="the .jsonl field holding the text (default 'text')")
    c = sub.add_parser("check", help="scan every shard in full for bad headers, dtypes, widths and ids")
    c.add_argument("data_dir", type=Path, help="folder of shard_*.npy files")
    c.add_argument("--tokenizer", help="check ids against this tokenizer's vocab size")
    c.add_argument("--vocab-size", type=int, help="check ids against this vocab size (default: the tokenizer's, "
                   "else meta.json's; without any, only negative ids are caught)")
    d = sub.add_parser("download", help="fetch shards of a Hugging Face dataset")
    d.add_argument("--repo", default="SuperGoatScriptGuy/PreprocessedMIXED")
    d.add_argument("--shards", default="0-49", help="indices like 0-49 or 0,3,7-9 (default 0-49)")
    d.add_argument("--out", default="./data")
    return parser


def run(args: argparse.Namespace) -> None:
    """Run the sub-command `args` name."""
    if args.command == "prepare":
        if args.seq_len < 2 or (args.shard_rows is not None and args.shard_rows < 1):
            raise TachyonError("--seq-len must be >= 2 and --shard-rows >= 1")
        prepare(args.tokenizer, args.input, args.out, seq_len=args.seq_len, shard_rows=args.shard_rows,
                text_field=args.text_field)
    elif args.command == "check":
        run_check(args.data_dir, args.tokenizer, args.vocab_size)
    else:
        download(args.repo, args.shards, args.out)


def main(argv: list[str] | None = None) -> int:
    """`python -m tachyon.data prepare|check|download ...`; user errors print one `error:` line and return 2."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), interrupted="interrupted; run the same command again to continue")
