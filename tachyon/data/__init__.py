"""Training data: shards of token ids, read, made, fetched and checked. None of it imports the model or Triton.

    python -m tachyon.data prepare --tokenizer T --input PATH... --out DIR --seq-len 2048
    python -m tachyon.data download --repo SuperGoatScriptGuy/PreprocessedMIXED --shards 0-49 --out ./data
    python -m tachyon.data check DIR [--tokenizer T | --vocab-size N]

- shards.py   the format: `shard_NNNNN.npy` files found (`find_shards`), their headers checked (`open_shard`),
              documents packed into them (`ShardWriter`)
- loader.py   `BatchLoader`: seeded, resumable (inputs, targets) batches, each window read with `os.pread`
- prepare.py  `prepare`: your own .txt/.md/.jsonl into shards, resumable
- hub.py      `download`: named shards of a Hugging Face dataset
- default.py  `embedded_default`: the Python standard library as a ready corpus and tokenizer
- check.py    `check_shards`: every shard read in full, every bad id listed
- cli.py      the command line above (`__main__.py` runs it)
"""

from .check import check_shards
from .default import cache_dir, embedded_default
from .hub import download, parse_shard_range
from .loader import IGNORE_INDEX, BatchLoader
from .prepare import prepare
from .shards import SHARD_GLOB, ShardInfo, ShardWriter, find_shards, open_shard, shard_name

__all__ = ["IGNORE_INDEX", "SHARD_GLOB", "BatchLoader", "ShardInfo", "ShardWriter", "cache_dir", "check_shards",
           "download", "embedded_default", "find_shards", "open_shard", "parse_shard_range", "prepare", "shard_name"]
