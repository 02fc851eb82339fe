"""Text generation with a KV cache: `python -m tachyon.generate` and `generate()` / `generate_ids()`.

The prompt is run through the model once (`prefill`), filling one KVCache per layer and computing
the head's logits for the last position only; after that each new token costs one single-position
forward (`decode_one_token`) that attends to the cached keys and values rather than a forward over
the whole prefix. Prompts of different lengths share a batch by left padding plus a key mask; RoPE
is relative, so a row shifted right by its padding scores exactly as it would alone.

The caches have a fixed length and the write position is a tensor, so `decode_one_token` compiles
to one graph for every step (gpt-fast style): `compile=True` / `--compile` wraps it in
torch.compile (CUDA graphs on CUDA); the prefill stays eager. Sampling options travel as one
`SamplingConfig`; `generate()` and the CLI run the model under the same autocast dtype
(hardware.autocast_dtype: bf16 on a CUDA GPU that has it, else fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import DEFAULT_RUN_DIR, checkpoint_tokenizer, latest_checkpoint, load_model
from .errors import TachyonError, run_cli
from .hardware import autocast_dtype, check_kernel_backend, resolve_device
from .layers import KVCache
from .model import TachyonLM
from .tokenizer import Tokenizer, check_fits

__all__ = [
    "SamplingConfig",
    "compiled_decode",
    "decode_one_token",
    "generate",
    "generate_ids",
    "left_pad",
    "prefill",
    "sample",
]

QUIT_WORDS = frozenset({"quit", "exit", "q"})


# ----------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplingConfig:
    """How many tokens to generate and how to pick each one; checked when made (NaN fails every check too)."""

    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # sample among the k likeliest; 0: no top-k cut
    top_p: float = 0.9  # nucleus mass; 1: no nucleus cut

    def __post_init__(self) -> None:
        if not self.max_new_tokens >= 1:
            raise TachyonError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise TachyonError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not self.top_k >= 0:
            raise TachyonError(f"top-k must be >= 0 (0 = no top-k cut), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise TachyonError(f"top-p must be in (0, 1] (1 = no nucleus cut), got {self.top_p}")


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits -> (B, V) fp32 probabilities after temperature, top-k and top-p (temperature > 0).

    top-k keeps the k largest logits (ties at the k-th value are kept too); top-p then keeps the
    smallest set of most likely tokens whose probability reaches top_p, always at least one.
    """
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the better tokens
        drop_sorted = mass_before >= top_p  # never drops the first (mass_before == 0 < top_p)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.8, top_k: int = 50, top_p: float = 0.9,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of (B, V) logits -> (B,) int64; temperature 0 is greedy (argmax).

    Sampling uses the exponential-race trick (argmax of p / Exp(1) noise is a draw from p), which
    needs no host sync and compiles, as in gpt-fast.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# The two model steps: separate plain functions, so each can be wrapped in torch.compile alone.
# Every tensor decode_one_token sees keeps its shape from step to step (the caches are fixed
# length, the position is a (1,) tensor), so a compiled decode_one_token never recompiles.


@torch.no_grad()
def prefill(model: TachyonLM, idx: torch.Tensor, caches: list[KVCache],
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the (left-padded) prompts idx (B, T) through the model at positions 0..T-1, filling the empty caches.

    mask (B, max_len) marks the attendable keys over the whole cache (None when no row is
    padded). Returns the logits (B, V) of the last position, the only one the head computes: the
    distribution of the first new token.
    """
    input_pos = torch.arange(idx.shape[1], device=idx.device)  # (T,)
    return model(idx, caches=caches, mask=mask, input_pos=input_pos, last_only=True).logits[:, -1]


@torch.no_grad()
def decode_one_token(model: TachyonLM, token: torch.Tensor, input_pos: torch.Tensor, caches: list[KVCache],
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one new token per row, token (B, 1), at cache position input_pos (1,); returns logits (B, V).

    mask (B, max_len) marks the attendable keys over the whole cache (None when no row is padded).
    """
    return model(token, caches=caches, mask=mask, input_pos=input_pos, last_only=True).logits[:, -1]


@functools.cache
def compiled_decode(device_type: str) -> Callable[..., torch.Tensor]:
    """decode_one_token under torch.compile for a device type, built once per process.

    CUDA uses mode="reduce-overhead" (CUDA graphs: one launch per step); elsewhere Inductor's
    default mode. fullgraph=True turns any graph break into an error instead of a slow fallback.
    """
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_one_token, mode=mode, fullgraph=True)


# ----------------------------------------------------------------------------------------------
# Token-level generation


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token id lists -> (B, T) ids right-aligned with pad_id on the left, and a (B, T) bool mask.

    The mask is True at real tokens; it is None when every prompt has the same length, so
    unpadded batches take the unmasked attention path.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TachyonError("the prompt is empty: give at least one character of text")
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, ids in enumerate(prompts):
        idx[row, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids):] = True
    if bool(mask.all()):
        return idx.to(device), None
    return idx.to(device), mask.to(device)


def key_mask(prompt_mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """The (B, max_len) key mask of a cache: the (B, T) prompt's mask, then True for generated tokens."""
    batch, prompt_len = prompt_mask.shape
    mask = torch.ones(batch, max_len, dtype=torch.bool, device=prompt_mask.device)
    mask[:, :prompt_len] = prompt_mask
    return mask


def token_budget(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> tuple[int, bool]:
    """How many tokens can be generated after a prompt of prompt_len (padded) tokens.

    The prompt plus everything generated must fit in the model's context. Returns the budget
    and whether the context, not max_new_tokens, set it. A prompt that leaves no room is an error.
    """
    if prompt_len >= max_seq_len:
        raise TachyonError(
            f"the prompt is {prompt_len} tokens but the model's context is {max_seq_len} tokens: "
            f"shorten it to at most {max_seq_len - 1} tokens"
        )
    room = max_seq_len - prompt_len
    return min(max_new_tokens, room), room < max_new_tokens


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A torch.Generator seeded with `seed` on `device` (passed through if already one; None: global RNG)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate_ids(model: TachyonLM, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int = 128,
                 temperature: float = 0.8, top_k: int = 50, top_p: float = 0.9,
                 seed: int | torch.Generator | None = None, eot_id: int | None = None, pad_id: int = 0,
                 vocab_limit: int | None = None, amp_dtype: torch.dtype | None = None,
                 compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the new token ids, a (B,) int64 tensor per step, for a batch of token-id prompts.

    - prompts: a list of id lists (any lengths; left padded here) or a (B, T) tensor.
    - A row that has produced eot_id keeps yielding eot_id; generation ends when every row has
      (or after max_new_tokens, or when the context is full: see token_budget).
    - seed: an int or a torch.Generator makes samples reproducible; None uses the global RNG.
    - vocab_limit: sample only ids below it (a tokenizer smaller than the model's embedding).
    - amp_dtype: run the model under autocast to this dtype (e.g. bfloat16 on a GPU).
    - compile: run decode steps through compiled_decode. Its caches then span the whole context,
      so every prompt of a batch size reuses one graph; the first call pays for compiling.
    The model is put in eval mode while generating and restored afterwards.
    """
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p)
    device = _model_device(model)
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    idx, prompt_mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = idx.shape
    budget, _ = token_budget(prompt_len, sampling.max_new_tokens, model.config.max_seq_len)
    generator = make_generator(seed, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    max_len = model.config.max_seq_len if compile else prompt_len + budget - 1  # the last token is never fed back
    mask = None if prompt_mask is None else key_mask(prompt_mask, max_len)
    decode = compiled_decode(device.type) if compile else decode_one_token

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        return sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)

    was_training = model.training
    model.eval()
    try:
        with autocast:
            caches = model.new_caches(batch, max_len, static_address=compile)
            logits = prefill(model, idx, caches, mask)
        input_pos = torch.tensor([prompt_len - 1], device=device)  # (1,) advanced before each decode step
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(budget):
            token = pick(logits)
            if eot_id is not None:
                token = token.masked_fill(done, eot_id)
                done |= token == eot_id
            yield token
            if step + 1 == budget or (eot_id is not None and bool(done.all())):
                return
            input_pos = input_pos + 1
            with autocast:
                logits = decode(model, token[:, None], input_pos, caches, mask)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# Text-level generation


def check_utf8(text: str) -> None:
    """Refuse text holding undecodable bytes (Python keeps them from argv or stdin as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TachyonError(f"the prompt is not valid UTF-8 (an undecodable byte at character {e.start}); "
                           "give the text in UTF-8") from None


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str], model: TachyonLM) -> list[list[int]]:
    """Tokenize the prompts, checking the tokenizer fits the model and each prompt fits the context."""
    check_fits(tokenizer, model.config.vocab_size)
    for text in texts:
        if not isinstance(text, str) or not text:
            raise TachyonError("the prompt is empty: give at least one character of text")
        check_utf8(text)
    ids = [list(row) for row in tokenizer.encode_batch(list(texts))]
    longest = max(len(row) for row in ids)
    token_budget(longest, 1, model.config.max_seq_len)  # raises when a prompt leaves no room
    if any(len(row) == 0 for row in ids):
        raise TachyonError("a prompt encodes to no tokens: give some text the tokenizer can read")
    return ids


def text_ids(model: TachyonLM, tokenizer: Tokenizer, prompt_ids: list[list[int]], sampling: SamplingConfig,
             seed: int | torch.Generator | None, compile: bool) -> Iterator[torch.Tensor]:
    """generate_ids for prompts of `tokenizer`: its end-of-text, pad and vocab size, and the autocast dtype of
    hardware.autocast_dtype, so that generate() and the CLI run the model alike."""
    return generate_ids(model, prompt_ids, **dataclasses.asdict(sampling), seed=seed, eot_id=tokenizer.eot_id,
                        pad_id=tokenizer.fill_id, vocab_limit=tokenizer.vocab_size,
                        amp_dtype=autocast_dtype(_model_device(model)), compile=compile)


def generate(model: TachyonLM, tokenizer: Tokenizer, prompts: str | list[str], max_new_tokens: int = 128,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 0.9,
             seed: int | torch.Generator | None = None, compile: bool = False) -> str | list[str]:
    """Continue one prompt (-> str) or a list of prompts (-> list[str]); returns only the new text.

    Each row stops at the tokenizer's end-of-text token or after max_new_tokens; if the model's
    context fills first, generation stops there with a warning. temperature 0 is greedy. On a CUDA
    GPU with bf16 the model runs under bf16 autocast, as in the CLI (see text_ids).
    compile: torch.compile the decode step (see generate_ids).
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        return []
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p)
    prompt_ids = encode_prompts(tokenizer, texts, model)
    _, context_bound = token_budget(max(map(len, prompt_ids)), max_new_tokens, model.config.max_seq_len)
    eot = tokenizer.eot_id
    new_ids: list[list[int]] = [[] for _ in texts]
    finished = [False] * len(texts)
    for step in text_ids(model, tokenizer, prompt_ids, sampling, seed, compile):
        for row, token in enumerate(step.tolist()):
            if finished[row] or token == eot:
                finished[row] = True
            else:
                new_ids[row].append(token)
    if context_bound and not all(finished):
        warnings.warn(f"stopped at the model's context limit of {model.config.max_seq_len} tokens", stacklevel=2)
    outputs = [tokenizer.decode(ids) for ids in new_ids]
    return outputs[0] if single else outputs


class TextStream:
    """Turns one row's token ids into printable text pieces as they arrive.

    Byte-level BPE splits multi-byte characters across tokens, so decoding a token alone can
    give a replacement character; a piece is released only once it decodes cleanly. Decoding
    works on a short window (the last released tokens as context, then the unreleased ones) so
    each step costs O(1) rather than re-decoding the whole text.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context[-4:])  # context keeps word-boundary spaces right
        self.prefix = 0  # start of the decoding window
        self.read = len(self.ids)  # ids before this are already released

    def push(self, token_id: int) -> str:
        """Add a token; return the new text it completes ('' while a character is incomplete)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


# ----------------------------------------------------------------------------------------------
# Command line


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The checkpoint file to load: the given file, the newest in a given run directory, or the default run's."""
    if path is None:
        found = latest_checkpoint(DEFAULT_RUN_DIR)
        if found is None:
            raise TachyonError(
                f"no checkpoint in {DEFAULT_RUN_DIR}: run `python -m tachyon.train` first, or pass --checkpoint PATH"
            )
        return found
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise TachyonError(f"no checkpoint_<step>.pt in directory {path}")
        return found
    if not path.is_file():
        raise TachyonError(f"checkpoint {path} does not exist")
    return path


def load_for_generation(checkpoint: str | Path | None, tokenizer_path: str | Path | None,
                        device: torch.device) -> tuple[TachyonLM, Tokenizer, Path]:
    """Load the model (eval mode) and its tokenizer, checking that they belong together (size and file hash)."""
    path = resolve_checkpoint(checkpoint)
    model, meta = load_model(path, device)
    model.eval()
    tokenizer = checkpoint_tokenizer(meta, path, override=tokenizer_path)
    check_fits(tokenizer, model.config.vocab_size)
    return model, tokenizer, path


def stream_completion(model: TachyonLM, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig,
                      generator: torch.Generator | None, compile: bool = False, echo_prompt: bool = False,
                      out: Any = None) -> tuple[int, float]:
    """Print the continuation of one prompt to `out` as tokens arrive; return (new tokens, seconds).

    With echo_prompt the prompt is printed first (once it is known to fit), so the output reads
    as one text.
    """
    out = sys.stdout if out is None else out
    prompt_ids = encode_prompts(tokenizer, [prompt], model)
    if echo_prompt:
        out.write(prompt)
    budget, context_bound = token_budget(len(prompt_ids[0]), sampling.max_new_tokens, model.config.max_seq_len)
    stream = TextStream(tokenizer, prompt_ids[0])
    count, hit_eot = 0, False
    start = time.perf_counter()
    for step in text_ids(model, tokenizer, prompt_ids, sampling, generator, compile):
        token = int(step[0])
        count += 1
        if token == tokenizer.eot_id:
            hit_eot = True
            break
        out.write(stream.push(token))
        out.flush()
    out.write(stream.flush() + "\n")
    out.flush()
    seconds = time.perf_counter() - start
    if context_bound and count == budget and not hit_eot:
        print(f"[stopped: reached the model's context limit of {model.config.max_seq_len} tokens]", file=sys.stderr)
    return count, seconds


def _report_speed(count: int, seconds: float) -> None:
    print(f"[{count} tokens in {seconds:.2f} s, {count / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def interactive(model: TachyonLM, tokenizer: Tokenizer, sampling: SamplingConfig,
                generator: torch.Generator | None, compile: bool = False) -> None:
    """Read prompts until quit/exit/q, Ctrl-D or end of input; Ctrl-C stops the current reply."""
    print("Type a prompt and press Enter (quit, exit, q or Ctrl-D to leave).", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        except UnicodeDecodeError as e:  # stdin decodes strictly: that line is lost, the next one may be fine
            print(f"error: the prompt is not valid UTF-8 (byte {e.object[e.start]:#04x}); give the text in UTF-8",
                  file=sys.stderr)
            continue
        if prompt.strip().lower() in QUIT_WORDS:
            return
        if not prompt.strip():
            continue
        try:
            _report_speed(*stream_completion(model, tokenizer, prompt, sampling, generator, compile))
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        except TachyonError as e:  # e.g. a prompt too long for the context: say so and keep going
            print(f"error: {e}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tachyon.generate",
                                     description="Generate text from a Tachyon checkpoint with a KV cache.")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"checkpoint file or run directory (default: the newest in {DEFAULT_RUN_DIR})")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer JSON (default: the one recorded in the checkpoint)")
    parser.add_argument("--prompt", default=None, help="text to continue (default: an interactive prompt)")
    parser.add_argument("--max-tokens", type=int, default=128, help="most new tokens per reply (default 128)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest; 0 = off (default 50)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass in (0, 1]; 1 = off (default 0.9)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else the CPU), cpu, cuda, cuda:1, mps (default auto)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (CUDA graphs on CUDA); the first reply pays "
                             "for compiling (default off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    """The CLI's body: one completion for --prompt, else the interactive loop."""
    sampling = SamplingConfig(args.max_tokens, args.temperature, args.top_k, args.top_p)
    if args.prompt is not None and not args.prompt:
        raise TachyonError("the prompt is empty: give at least one character of text")
    device = resolve_device(args.device)
    check_kernel_backend()
    model, tokenizer, path = load_for_generation(args.checkpoint, args.tokenizer, device)
    generator = make_generator(args.seed, device)
    if args.prompt is None:
        print(f"loaded {path} ({model.config.n_layers} layers, d_model {model.config.d_model}) on {device}",
              file=sys.stderr)
        interactive(model, tokenizer, sampling, generator, args.compile)
        return
    _report_speed(*stream_completion(model, tokenizer, args.prompt, sampling, generator, args.compile,
                                     echo_prompt=True))


if __name__ == "__main__":
    sys.exit(main())
