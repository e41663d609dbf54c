"""Record llama.cpp's tokenization of a fixed set of texts as golden fixtures for the tokenizer tests.

    .venv/bin/python tests/tools/make_tokenizer_fixtures.py [--out tests/fixtures/llamacpp_tokens.json]

Needs `llama-cpp-python` (the `bench` extra) and the test models (located by tests/engine/test_tokenizer.py);
the texts come from tests/fixtures/tokenizer_texts.json.
For every model it writes the ids of each text (with and without special-token parsing), llama.cpp's
BOS / EOS / add-BOS / end-of-generation ids, the bytes llama.cpp prints for a sample of tokens and
its detokenization of each case. CI compares `engine.tokenizer` against this file, so it needs no
llama.cpp.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.engine.test_tokenizer import TOKENIZER_TEXTS, model_paths  # noqa: E402

logger = logging.getLogger("make_tokenizer_fixtures")

PIECE_STRIDE = 257  # every 257th id is sampled for token_to_piece, besides ids that occur in the cases


def _piece(llama_cpp: object, vocab: object, token_id: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token_id, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token_id, buf, len(buf), 0, special)
    return buf.raw[:n]


def _detokenize(llama_cpp: object, vocab: object, ids: list[int]) -> bytes:
    """llama_detokenize without special tokens (Llama.detokenize truncates pieces over 32 bytes)."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), False, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), False, False)
    return buf.raw[:n]


def record(path: Path) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    cases = []
    used: set[int] = set()
    for text in TOKENIZER_TEXTS:
        for parse_special in (True, False):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special)
            used.update(ids)
            detok = _detokenize(llama_cpp, vocab, ids)
            cases.append(
                {
                    "text": text,
                    "parse_special": parse_special,
                    "add_special": False,
                    "ids": ids,
                    "detok": detok.hex(),
                }
            )
    ids = llm.tokenize(TOKENIZER_TEXTS[0].encode("utf-8"), add_bos=True, special=True)
    cases.append(
        {"text": TOKENIZER_TEXTS[0], "parse_special": True, "add_special": True, "ids": ids, "detok": None}
    )

    eog = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    control = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_control(vocab, i)]
    sample = sorted(used | set(eog) | set(range(0, n_vocab, PIECE_STRIDE)))
    pieces = {str(i): _piece(llama_cpp, vocab, i, False).hex() for i in sample}

    def opt(token_id: int) -> int | None:
        return None if token_id < 0 else token_id

    return {
        "file": path.name,
        "n_vocab": n_vocab,
        "bos_id": opt(llama_cpp.llama_vocab_bos(vocab)),
        "eos_id": opt(llama_cpp.llama_vocab_eos(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog_ids": eog,
        "control_ids": control,
        "cases": cases,
        "pieces": pieces,
    }


def _dump(value: object, indent: str = "") -> str:
    """JSON with one line per case / piece table / id list, so a regenerated file diffs readably."""
    if isinstance(value, dict) and indent.count(" ") < 6 and not all(k.isdigit() for k in value):
        inner = indent + "  "
        items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" + ("\n" if not indent else "")
    if isinstance(value, list) and value and isinstance(value[0], dict):
        inner = indent + "  "
        items = [inner + json.dumps(v, ensure_ascii=False) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "llamacpp_tokens.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = {
        "generated_by": "tests/tools/make_tokenizer_fixtures.py",
        "command": ".venv/bin/python tests/tools/make_tokenizer_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "models": {},
    }
    for name, path in model_paths().items():
        if path is None:
            logger.warning("%s: model file not found, skipped", name)
            continue
        logger.info("%s: %s", name, path)
        out["models"][name] = record(path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dump(out), encoding="utf-8")
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
