"""Generation: cached decoding equals full forwards, sampling stays in its set, the CLI's errors and loading."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import kernels
from tachyon import generate as gen
from tachyon.checkpoint import export_safetensors
from tachyon.config import PRESETS
from tachyon.errors import TachyonError
from tachyon.model import TachyonLM
from tachyon.tokenizer import Tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
STEPS = 64


def _model(**changes: object) -> TachyonLM:
    """A 2-layer nano model, fp32, re-initialised so that its logits are O(10) and varied.

    At the training init a random model's logits are O(0.1) (a 1e-4 check would say little) and,
    the head being tied, it mostly repeats its last token (greedy and sampling tests would be
    trivial). Full-width blocks (std 1/sqrt(fan_in)) outweigh the embedding in the residual
    stream, and a final-norm gain of 30 scales the logits up.
    """
    torch.manual_seed(0)
    model = TachyonLM(PRESETS["nano"].replace(n_layers=2, **changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name != "embed.weight":
                fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]  # (E, in, out) experts; (out, in) linears
                p.normal_(std=1 / math.sqrt(fan_in))
        model.norm.weight.fill_(30.0)
    return model


@pytest.fixture(scope="module")
def model() -> TachyonLM:
    return _model()


def _train_tokenizer(path: Path, vocab_size: int) -> Path:
    """A tiny byte-level BPE with <|endoftext|> = 0 and <|pad|> = 1, trained on some stdlib source."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = Path(dataclasses.__file__).read_text()
    backend.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    backend.save(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizers (small: 300 tokens, big: 400) and checkpoints of a vocab-320 model in three forms."""
    root = tmp_path_factory.mktemp("generate")
    small = _train_tokenizer(root / "small.json", 300)
    big = _train_tokenizer(root / "big.json", 400)
    ckpt_model = _model(vocab_size=320)
    # As a compiled model's trainer would have saved it: every key under `_orig_mod.`.
    compiled_keys = {f"_orig_mod.{k}": v for k, v in ckpt_model.state_dict().items()}
    config = dataclasses.asdict(ckpt_model.config)
    pt = root / "checkpoint_7.pt"
    torch.save({"model": compiled_keys, "config": config, "step": 7, "tokenizer_path": str(small)}, pt)
    st = export_safetensors(pt, root / "model.safetensors")
    garbage = root / "checkpoint_8.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    return {"small": small, "big": big, "pt": pt, "safetensors": st, "garbage": garbage, "root": root}


@pytest.fixture(scope="module")
def tokenizer(files: dict[str, Path]) -> Tokenizer:
    return load_tokenizer(files["small"])


def _full_logits(model: TachyonLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


# ----------------------------------------------------------------------------------------------
# Cached decoding == full forward


def _check_cached_against_full(model: TachyonLM, prompts: list[list[int]],
                               decode: Callable[..., torch.Tensor] = gen.decode_one_token) -> float:
    """Prefill then decode STEPS teacher-forced random tokens with `decode`; compare each row's logits with a full
    forward over that row's unpadded sequence at every step. Returns the largest difference seen."""
    g = torch.Generator().manual_seed(1)
    forced = torch.randint(2, model.config.vocab_size, (len(prompts), STEPS), generator=g)
    idx, prompt_mask = gen.left_pad(prompts, pad_id=1)
    batch, width = idx.shape
    caches = model.new_caches(batch, width + STEPS + 3)  # unwritten slots past the end stay masked
    mask = None if prompt_mask is None else gen.key_mask(prompt_mask, caches[0].max_len)
    logits = gen.prefill(model, idx, caches, mask)
    sequences = [list(p) for p in prompts]
    worst = 0.0
    for step in range(STEPS + 1):
        assert logits.shape == (batch, model.config.vocab_size)
        for row, seq in enumerate(sequences):
            worst = max(worst, (logits[row] - _full_logits(model, seq)).abs().max().item())
        if step == STEPS:
            break
        token = forced[:, step]
        for row, seq in enumerate(sequences):
            seq.append(int(token[row]))
        input_pos = torch.tensor([width + step])
        logits = decode(model, token[:, None], input_pos, caches, mask)
    assert caches[0].k.shape == (batch, width + STEPS + 3, model.config.n_kv_heads, model.config.head_dim)
    return worst




def test_left_padded_batch_matches_each_row_alone(model: TachyonLM) -> None:
    prompts = [[5, 17, 300, 4000, 9, 12, 13, 14, 15, 16, 8000], [42], [7, 7, 7, 1000]]
    assert _check_cached_against_full(model, prompts) < 1e-4


def test_test_model_is_not_degenerate(model: TachyonLM) -> None:
    """Guards for the tests here: logits big enough for 1e-4 to bite, greedy output not one repeated token."""
    assert _full_logits(model, [5, 17, 300]).std() > 3
    greedy = _uncached_greedy(model, [5, 17, 300], 16)
    assert len(set(greedy)) > 8


def test_pad_queries_stay_finite(model: TachyonLM) -> None:
    idx, mask = gen.left_pad([[3], [4, 5, 6, 7, 8, 9]], pad_id=1)
    with torch.no_grad():
        out = model(idx, caches=model.new_caches(2, 6), mask=mask, input_pos=torch.arange(6)).logits
    assert torch.isfinite(out).all()


def test_cache_misuse_is_a_clear_error(model: TachyonLM) -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len 512"):
        model.new_caches(1, 513)
    caches = model.new_caches(1, 4)
    with pytest.raises(ValueError, match=r"input_pos must be the \(2,\) cache positions"):
        model(torch.tensor([[5, 6]]), caches=caches)
    with pytest.raises(ValueError, match="5 new tokens exceed the cache's 4 positions"):
        model(torch.arange(5)[None], caches=caches, input_pos=torch.arange(5))


# ----------------------------------------------------------------------------------------------
# generate_ids


def _uncached_greedy(model: TachyonLM, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(_full_logits(model, seq).argmax()))
    return seq[len(prompt):]


def test_greedy_generation_equals_uncached_greedy_and_is_deterministic(model: TachyonLM) -> None:
    prompts = [[5, 17, 300, 4000, 9], [42, 43]]
    first = torch.stack(list(gen.generate_ids(model, prompts, 24, temperature=0)), dim=1)
    second = torch.stack(list(gen.generate_ids(model, prompts, 24, temperature=0)), dim=1)
    assert first.shape == (2, 24)
    assert torch.equal(first, second)
    for row, prompt in enumerate(prompts):
        assert first[row].tolist() == _uncached_greedy(model, prompt, 24)


def test_seed_makes_samples_reproducible(model: TachyonLM) -> None:
    def draw(seed: int) -> torch.Tensor:
        steps = gen.generate_ids(model, [[5, 6, 7]], 32, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        return torch.stack(list(steps), dim=1)

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_each_row_stops_at_end_of_text(model: TachyonLM) -> None:
    prompts = [[5, 17, 300], [42, 43, 44, 45], [9]]
    free = torch.stack(list(gen.generate_ids(model, prompts, 16, temperature=0)), dim=1)
    eot = int(free[0, 0])
    assert eot not in free[1:].flatten().tolist()  # premise: only row 0 ever produces it
    stopped = torch.stack(list(gen.generate_ids(model, prompts, 16, temperature=0, eot_id=eot)), dim=1)
    assert stopped[0].eq(eot).all()  # finished rows keep yielding eot
    assert torch.equal(stopped[1:], free[1:])  # the others are unaffected
    alone = list(gen.generate_ids(model, [prompts[0]], 16, temperature=0, eot_id=eot))
    assert len(alone) == 1  # every row done: generation ends


def test_context_limit_stops_with_a_notice(tokenizer: Tokenizer) -> None:
    small = _model(max_seq_len=24)
    ids = list(range(10, 30))  # 20 tokens: room for 4
    assert len(list(gen.generate_ids(small, [ids], 50, temperature=0))) == 4
    prompt = tokenizer.decode(tokenizer.encode("def f(x):\n    return x")[:20])
    with pytest.warns(UserWarning, match="context limit of 24 tokens"):
        gen.generate(small, tokenizer, prompt, max_new_tokens=50, temperature=0)
    with pytest.raises(TachyonError, match="the model's context is 24 tokens"):
        list(gen.generate_ids(small, [list(range(10, 34))], 5))


# ----------------------------------------------------------------------------------------------
# Compiled decoding


@pytest.fixture
def compiled_graphs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.fx.GraphModule]]:
    """Route compile=True through a fresh fullgraph torch.compile of decode_one_token; yields its graphs.

    The backend records each graph it is given and runs it with aot_eager (functionalised like
    Inductor's input, but without Inductor's C++ builds, too slow for CI's two cores).
    """
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(gen.decode_one_token, backend=recording_backend, fullgraph=True)
    monkeypatch.setattr(gen, "compiled_decode", lambda device_type: compiled)
    yield graphs
    torch._dynamo.reset()


def test_compiled_decode_matches_full_forward_at_every_step(model: TachyonLM, compiled_graphs: list) -> None:
    """decode_one_token under torch.compile(fullgraph=True), kernels on the reference backend (the CPU's), fp32:
    one graph for all STEPS steps, each step's logits within 1e-4 of a full forward over the sequence so far."""
    compiled = gen.compiled_decode("cpu")  # the fixture's fullgraph compile
    assert next(model.parameters()).dtype == torch.float32
    with kernels.use("reference"):
        assert _check_cached_against_full(model, [[5, 17, 300, 4000, 9]], decode=compiled) < 1e-4
    assert len(compiled_graphs) == 1


def test_prefill_computes_the_head_for_the_last_position_only(model: TachyonLM) -> None:
    """No (B, T, vocab) tensor is made for a prompt; the last position's logits equal the full forward's."""
    idx = torch.randint(2, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    caches = model.new_caches(2, 48)
    with _OutputShapes() as shapes:
        logits = gen.prefill(model, idx, caches)
    vocab = model.config.vocab_size
    assert (2, 1, vocab) in shapes.seen and (2, 40, vocab) not in shapes.seen and (80, vocab) not in shapes.seen
    with torch.no_grad():
        full = model(idx).logits
    assert full.shape == (2, 40, vocab) and torch.allclose(logits, full[:, -1], atol=1e-4, rtol=0)


class _OutputShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatch protocol
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.append(tuple(t.shape))
        return out


def test_generate_and_the_cli_run_under_one_autocast_dtype(model: TachyonLM, tokenizer: Tokenizer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ask hardware.autocast_dtype (bf16 on a CUDA GPU); faked here as float64 so the CPU can tell."""
    seen: list[torch.dtype | None] = []
    real = gen.generate_ids

    def recording(*args: object, **kwargs: object) -> Iterator[torch.Tensor]:
        seen.append(kwargs["amp_dtype"])
        return real(*args, **{**kwargs, "amp_dtype": None})

    monkeypatch.setattr(gen, "autocast_dtype", lambda device: torch.float64)
    monkeypatch.setattr(gen, "generate_ids", recording)
    gen.generate(model, tokenizer, "x", max_new_tokens=2, temperature=0)
    gen.stream_completion(model, tokenizer, "x", gen.SamplingConfig(max_new_tokens=2), None, out=io.StringIO())
    assert seen == [torch.float64, torch.float64]


def test_compiled_decode_gives_the_eager_tokens(model: TachyonLM, compiled_graphs: list) -> None:
    prompts = [[5, 17, 300, 4000, 9], [42, 43]]  # left padded: the key-mask path
    eager = torch.stack(list(gen.generate_ids(model, prompts, 16, temperature=0)), dim=1)
    compiled = torch.stack(list(gen.generate_ids(model, prompts, 16, temperature=0, compile=True)), dim=1)
    assert len(compiled_graphs) == 1
    assert torch.equal(compiled, eager)


def test_compiled_decode_never_recompiles(model: TachyonLM, compiled_graphs: list) -> None:
    """One graph serves every decode step and every prompt length of a batch size.

    The position is a tensor and the cache spans the whole context; a cache length or position
    held as a Python int would be guarded on, and the next step would recompile (an error here).
    """
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompts in ([[5, 17, 300], [42]], [[7, 8, 9, 10, 11, 12], [1000, 2000]]):
            steps = list(gen.generate_ids(model, prompts, 11, temperature=0, compile=True))
            assert len(steps) == 11  # the prefill's token, then 10 decode steps
    assert len(compiled_graphs) == 1


# ----------------------------------------------------------------------------------------------
# Sampling sets


def test_top_k_never_samples_outside_the_k_largest() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 100, generator=g).expand(4000, 100)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    drawn = gen.sample(logits, temperature=1.5, top_k=5, top_p=1.0, generator=g)
    assert set(drawn.tolist()) == allowed  # inside the set, and every member of it reachable


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()[None].expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    assert set(gen.sample(logits, 1.0, top_k=0, top_p=0.75, generator=g).tolist()) == {1, 3}
    assert set(gen.sample(logits, 1.0, top_k=0, top_p=0.5, generator=g).tolist()) == {1}
    assert set(gen.sample(logits, 1.0, top_k=0, top_p=0.85, generator=g).tolist()) == {1, 2, 3}
    both = gen.sample(logits, 1.0, top_k=2, top_p=0.99, generator=g)  # top-k first, then top-p
    assert set(both.tolist()) == {1, 3}


def test_sampled_frequencies_follow_the_renormalised_distribution() -> None:
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    g = torch.Generator().manual_seed(0)
    drawn = gen.sample(probs.log()[None].expand(20000, 5), 1.0, top_k=0, top_p=0.75, generator=g)
    share_1 = drawn.eq(1).float().mean().item()
    assert math.isclose(share_1, 0.5 / 0.8, abs_tol=0.02)


def test_greedy_sample_is_argmax() -> None:
    logits = torch.randn(8, 50)
    assert torch.equal(gen.sample(logits, temperature=0), logits.argmax(-1))


# ----------------------------------------------------------------------------------------------
# Text API


def test_generate_returns_text_for_one_prompt_and_a_list(model: TachyonLM, tokenizer: Tokenizer) -> None:
    one = gen.generate(model, tokenizer, "def add(a, b):", max_new_tokens=12, temperature=0)
    many = gen.generate(model, tokenizer, ["def add(a, b):", "x"], max_new_tokens=12, temperature=0)
    assert isinstance(one, str) and one and isinstance(many, list) and len(many) == 2
    assert many[0] == one  # left padding does not change a row's greedy continuation
    assert gen.generate(model, tokenizer, "x", max_new_tokens=12, temperature=0) == many[1]
    sampled = gen.generate(model, tokenizer, "x", max_new_tokens=12, seed=5)
    assert sampled == gen.generate(model, tokenizer, "x", max_new_tokens=12, seed=5)


def test_generate_samples_only_tokenizer_ids(model: TachyonLM, tokenizer: Tokenizer) -> None:
    ids = gen.generate_ids(model, [[5, 6]], 64, temperature=2.0, top_k=0, top_p=1.0, seed=0,
                           vocab_limit=tokenizer.vocab_size)
    assert max(int(t) for t in ids) < tokenizer.vocab_size < model.config.vocab_size


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompts": ""}, "the prompt is empty"),
    ({"prompts": ["ok", ""]}, "the prompt is empty"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top-p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top-p must be in \(0, 1\]"),
    ({"top_k": -1}, "top-k must be >= 0"),
    ({"max_new_tokens": 0}, "max new tokens must be at least 1"),
    ({"prompts": "word " * 600}, "the model's context is 512 tokens"),
])
def test_generate_rejects_bad_input(model: TachyonLM, tokenizer: Tokenizer, kwargs: dict, message: str) -> None:
    args = {"prompts": "hello", **kwargs}
    with pytest.raises(TachyonError, match=message):
        gen.generate(model, tokenizer, **args)


def test_generate_rejects_a_tokenizer_bigger_than_the_model(files: dict[str, Path]) -> None:
    with pytest.raises(TachyonError, match="has 400 tokens but the model.s vocab_size is 320"):
        gen.generate(_model(vocab_size=320), load_tokenizer(files["big"]), "hello")


def test_text_stream_renders_multibyte_characters(tokenizer: Tokenizer) -> None:
    text = "naïve café → 日本語 ok 🎉!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # premise: some characters span several tokens
    stream = gen.TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# ----------------------------------------------------------------------------------------------
# Command line


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = gen.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_cli_generates_from_compiled_checkpoint_and_safetensors(files: dict[str, Path], kind: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--checkpoint", str(files[kind]), "--prompt", "def ", "--max-tokens", "10", "--temperature", "0",
            "--device", "cpu"]
    if kind == "safetensors":  # the export records the tokenizer path too; pass it anyway once
        argv += ["--tokenizer", str(files["small"])]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert out.startswith("def ") and len(out) > len("def \n")
    assert "tokens/s" in err
    greedy_pt = out
    code, out_again, _ = _run(argv, capsys)
    assert out_again == greedy_pt


def test_cli_compile_flag_gives_the_eager_text(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                               compiled_graphs: list) -> None:
    argv = ["--checkpoint", str(files["pt"]), "--prompt", "def ", "--max-tokens", "8", "--temperature", "0",
            "--device", "cpu"]
    _, eager, _ = _run(argv, capsys)
    code, compiled, err = _run([*argv, "--compile"], capsys)
    assert code == 0, err
    assert compiled == eager and len(compiled_graphs) == 1


def test_cli_pt_and_safetensors_agree(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--prompt", "class ", "--max-tokens", "8", "--seed", "3", "--device", "cpu"]
    _, from_pt, _ = _run(["--checkpoint", str(files["pt"]), *common], capsys)
    _, from_st, _ = _run(["--checkpoint", str(files["safetensors"]), *common], capsys)
    assert from_pt == from_st


def test_cli_checkpoint_directory_picks_the_newest_readable_name(files: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # checkpoint_8.pt (garbage) is the newest: the directory resolves to it and its error says so.
    code, _, err = _run(["--checkpoint", str(files["root"]), "--prompt", "x"], capsys)
    assert code == 2 and "checkpoint_8.pt" in err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(("extra", "message"), [
    (["--checkpoint", "nowhere/checkpoint_1.pt"], "checkpoint nowhere/checkpoint_1.pt does not exist"),
    (["--checkpoint", "{garbage}"], "cannot read checkpoint"),
    (["--tokenizer", "{big}"], "has 400 tokens but the model's vocab_size is 320"),
    (["--tokenizer", "nowhere.json"], "tokenizer file nowhere.json not found"),
    (["--prompt", "word " * 600], "the model's context is 512 tokens"),
    (["--prompt", ""], "the prompt is empty"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], r"top-p must be in (0, 1]"),
    (["--top-p", "1.01"], r"top-p must be in (0, 1]"),
    (["--top-k", "-3"], "top-k must be >= 0"),
    (["--max-tokens", "0"], "max new tokens must be at least 1"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
])
def test_cli_bad_input_gives_one_error_line(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                            extra: list[str], message: str) -> None:
    extra = [a.format(**{k: str(v) for k, v in files.items()}) for a in extra]
    argv = ["--checkpoint", str(files["pt"]), "--prompt", "hi", "--device", "cpu", *extra]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert message in _one_error_line(err)
    assert out == ""


def test_cli_without_a_checkpoint_says_to_train_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # DEFAULT_RUN_DIR is relative: runs/default under the working directory
    code, _, err = _run(["--prompt", "def "], capsys)
    assert code == 2
    assert "run `python -m tachyon.train` first" in _one_error_line(err)


@pytest.mark.parametrize("script", ["def \nquit\n", "def \n\nclass \n", "exit\n"])
def test_cli_interactive_loop(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str], script: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # ends with quit / exit, or plain end of input
    code, out, err = _run(["--checkpoint", str(files["pt"]), "--max-tokens", "5", "--device", "cpu"], capsys)
    assert code == 0
    replies = sum(1 for line in script.splitlines() if line.strip() and line.strip() not in gen.QUIT_WORDS)
    assert err.count("tokens/s") == replies
    assert out.count("> ") >= replies + (1 if replies == 0 else 0)


def test_cli_runs_as_a_module(files: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tachyon.generate", "--checkpoint", str(files["pt"]), "--prompt", "def ",
         "--max-tokens", "6", "--seed", "0", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def ") and "tokens/s" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Fault and bad-input review (issue 15)


def test_cli_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(files: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = torch.load(files["pt"], weights_only=False)
    ckpt["tokenizer_sha256"] = load_tokenizer(files["big"]).sha256  # trained with another tokenizer file
    torch.save(ckpt, tmp_path / "checkpoint_7.pt")
    argv = ["--checkpoint", str(tmp_path / "checkpoint_7.pt"), "--prompt", "def ", "--max-tokens", "3",
            "--device", "cpu"]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert f"but {files['small']} has sha256" in _one_error_line(err)
    code, out, err = _run([*argv, "--tokenizer", str(files["small"])], capsys)  # named explicitly: a warning
    assert code == 0 and out.startswith("def ") and err.startswith("warning: ")


def test_cli_non_utf8_prompts_are_one_error_line(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--checkpoint", str(files["pt"]), "--max-tokens", "3", "--device", "cpu"]
    code, _, err = _run([*argv, "--prompt", "caf\udce9"], capsys)  # how Python keeps a Latin-1 byte from argv
    assert code == 2 and "not valid UTF-8" in _one_error_line(err)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\nquit\n"), encoding="utf-8"))
    code, _, err = _run(argv, capsys)
    assert code == 0 and "error: the prompt is not valid UTF-8 (byte 0xe9)" in err and "Traceback" not in err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_cli_mps_where_unsupported_is_one_error_line(files: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["--checkpoint", str(files["pt"]), "--prompt", "x", "--device", "mps"], capsys)
    assert code == 2 and "has no MPS" in _one_error_line(err)


def test_export_refuses_bad_destinations_and_writes_a_readable_file(files: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from tachyon.checkpoint import load_model
    from tachyon.checkpoint import main as checkpoint_main

    cases = [([str(files["pt"]), str(tmp_path / "missing" / "m.safetensors")], "folder"),
             ([str(files["pt"]), str(tmp_path / "m.pt")], "name the output *.safetensors"),
             ([str(files["root"]), str(tmp_path / "m.safetensors")], "is a directory")]
    for args, message in cases:
        assert checkpoint_main(["export", *args]) == 2
        assert message in _one_error_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())
    assert checkpoint_main(["export", str(files["pt"]), str(tmp_path / "m.safetensors")]) == 0
    mode = os.stat(tmp_path / "m.safetensors").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    _, meta = load_model(tmp_path / "m.safetensors")
    assert meta["step"] == 7


def test_the_attention_mask_is_built_once_per_forward(model: TachyonLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left-padded generation builds the key mask once per model call (prefill, each decode step), not in
    every layer on every token."""
    import tachyon.layers as layers

    assert model.config.n_layers > 1
    calls: list[int] = []
    build = layers.attention_mask
    monkeypatch.setattr(layers, "attention_mask", lambda *a: calls.append(1) or build(*a))
    steps = list(gen.generate_ids(model, [[5, 6, 7], [8]], max_new_tokens=4, temperature=0))
    assert len(steps) == 4 and len(calls) == 1 + 3  # the prefill, then 3 decode steps (the last token is not fed)
