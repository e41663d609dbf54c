"""Tokenizer built from a GGUF file's vocabulary, producing the same ids as llama.cpp.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE. Run by `tokenizers` with a BPE model from the GGUF tokens + merges and a
  pre-tokenizer made of the split regexes llama.cpp uses for the file's `tokenizer.ggml.pre`.
- "llama": SentencePiece BPE over scores. Run by `sentencepiece` from a ModelProto assembled from
  the GGUF tokens, scores and types (identity normalizer, spaces escaped to U+2581, optional dummy
  prefix, byte fallback when the vocabulary has the 256 byte tokens).

Special tokens are split off before either backend sees the text, exactly the way llama.cpp does it:
every control / user-defined / unknown token is searched for in turn, longest text first, and each
occurrence cuts the remaining raw text. Control and unknown tokens are only honoured when
`parse_special` is on; user-defined tokens always are (llama.cpp and `tokenizers` agree on that).
llama.cpp also re-types some tokens by their text (end-of-generation markers become control tokens);
that is reproduced here because it changes both splitting and decoding.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from collections.abc import Mapping, Sequence

from engine.errors import ModelFileError

logger = logging.getLogger(__name__)

# GGUF token types (the SentencePiece enumeration).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_C_SPACE = " \t\n\v\f\r"  # what C isspace() accepts: used by the lstrip / rstrip token attributes
_SPM_SPACE = "\u2581"  # "▁", SentencePiece's escaped space

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer split regexes per `tokenizer.ggml.pre`, as llama.cpp (src/llama-vocab.cpp) applies
# them: each regex in a list splits every piece left by the previous one, keeping matches and the
# text between them as separate pieces. Only the families below are accepted; llama.cpp itself
# refuses unknown names.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

_PRE_FAMILIES: list[tuple[tuple[str, ...], tuple[str, ...], bool, bool]] = [
    # (pre names, regexes, ignore_merges, add_bos default)
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
    (
        ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling", "mellum"),
        (_GPT2,),
        False,
        False,
    ),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        (_LLAMA3,),
        True,
        True,
    ),
    (("dbrx", "smaug-bpe"), (_LLAMA3,), False, False),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), (_QWEN2,), False, False),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
        (r"\p{N}", _GPT2),
        False,
        False,
    ),
]

# Tokens llama.cpp treats as end of generation by their text (llama-vocab.cpp, "special_eog_ids").
_EOG_TEXTS = frozenset(
    [
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    ]
)  # fmt: skip
# Texts llama.cpp uses to find an end-of-turn token when the file names none.
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)  # fmt: skip
_EOM_TEXTS = ("<|eom_id|>",)
# Fill-in-the-middle pad / repo / file-separator tokens: llama.cpp ends generation on these too.
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
# Fill-in-the-middle prefix / suffix / middle: typed control when found by text, but not end of generation.
_FIM_PRE_TEXTS = (
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
    "<|code_prefix|>", "<|prefix|>",
)  # fmt: skip
_FIM_SUF_TEXTS = (
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
    "<|code_suffix|>", "<|suffix|>",
)  # fmt: skip
_FIM_MID_TEXTS = (
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
    "<|code_middle|>", "<|middle|>",
)  # fmt: skip
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: user-defined

_FIX = "Re-download the model, or pick another GGUF file."


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, a few
    invisible ones) are moved, in byte order, to code points 256 and up.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table: dict[int, str] = {}
    moved = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


_UNICODE_TO_BYTE = {ch: b for b, ch in _byte_to_unicode().items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _trie_regex(words: Sequence[str]) -> str:
    """A regex matching any of `words`, the longest one where several match at the same place.

    Built as a trie (alternatives branch on their first character), so the regex engine does a
    constant amount of work per position instead of trying thousands of alternatives.
    """
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = True

    def emit(node: dict) -> str:
        branches = []
        for ch in sorted(k for k in node if k):
            child, literal = node[ch], re.escape(ch)
            while len(child) == 1 and "" not in child:  # fold single-child chains into one literal
                (nxt,) = child
                literal += re.escape(nxt)
                child = child[nxt]
            branches.append(literal + emit(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


def _metadata_of(gguf_file: object) -> Mapping[str, object]:
    metadata = getattr(gguf_file, "metadata", gguf_file)
    if not isinstance(metadata, Mapping):
        raise TypeError("from_gguf needs an object with a .metadata dict (engine.gguf_file.GGUFModelFile)")
    return metadata


def _int_or_none(metadata: Mapping[str, object], key: str, n_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFileError(f"The model's {key} is {value!r}, not a token id. {_FIX}")
    if not 0 <= value < n_tokens:
        logger.warning("%s = %d is outside the vocabulary (%d tokens); ignoring it", key, value, n_tokens)
        return None
    return value


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary. Build it with `Tokenizer.from_gguf(model_file)`."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool

    def __init__(
        self,
        *,
        model: str,
        tokens: list[str],
        token_types: list[int],
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: frozenset[int],
        add_bos: bool,
        add_space_prefix: bool,
        specials: list[tuple[str, int, bool, bool, bool]],
        backend: object,
    ) -> None:
        self.model = model  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
        self.tokens = tokens
        self.token_types = token_types  # after llama.cpp's re-typing by text
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = eog_ids
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        # (text, id, needs parse_special, lstrip, rstrip), longest text first
        self._specials = specials
        # One regex pass finds, at every position, the longest special starting there; the specials
        # that are prefixes of it may start there too. Only those few are then searched for.
        index = {special[0]: k for k, special in enumerate(specials)}
        self._special_index = index
        self._special_prefixes = {
            k: [index[text[:n]] for n in range(1, len(text)) if text[:n] in index]
            for k, (text, *_) in enumerate(specials)
        }
        self._special_finder = (
            re.compile("(?=(" + _trie_regex([s[0] for s in specials]) + "))") if specials else None
        )
        self._backend = backend
        self._piece_bytes: list[bytes | None] = [None] * len(tokens)  # filled on first use
        self._fingerprint: str | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf_file: object) -> Tokenizer:
        """Build the tokenizer from a GGUF file (anything with a `.metadata` dict of plain values)."""
        metadata = _metadata_of(gguf_file)
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise ModelFileError(f"The model file has no tokenizer (tokenizer.ggml.model is missing). {_FIX}")
        if model in ("no_vocab", "none"):
            raise ModelFileError("The model file carries no vocabulary, so it cannot be used for chat.")
        if model not in ("gpt2", "llama"):
            raise ModelFileError(
                f"The model's tokenizer type {model!r} is not supported (supported: byte-level BPE 'gpt2' "
                "and SentencePiece 'llama'). Pick a model with one of those vocabularies."
            )
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ModelFileError(
                f"The model's vocabulary (tokenizer.ggml.tokens) is missing or broken. {_FIX}"
            )
        n = len(tokens)
        # llama.cpp names empty tokens so that every id keeps a distinct text
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        raw_types = metadata.get("tokenizer.ggml.token_type")
        if raw_types is None:
            token_types = [NORMAL] * n
        elif (
            isinstance(raw_types, list)
            and len(raw_types) >= n
            and all(isinstance(t, int) and not isinstance(t, bool) for t in raw_types[:n])
        ):
            token_types = list(raw_types[:n])
        else:
            raise ModelFileError(f"The model's token types do not match its vocabulary. {_FIX}")

        pre = metadata.get("tokenizer.ggml.pre")
        pre = pre if isinstance(pre, str) and pre else "default"
        add_bos = model == "llama"
        ignore_merges = False
        regexes: tuple[str, ...] = ()
        if model == "gpt2":
            for names, family_regexes, family_ignore_merges, family_add_bos in _PRE_FAMILIES:
                if pre in names:
                    regexes, ignore_merges, add_bos = family_regexes, family_ignore_merges, family_add_bos
                    break
            else:
                raise ModelFileError(
                    f"The model's pre-tokenizer {pre!r} is not supported yet, so its text would be split "
                    "wrongly. Pick another model."
                )
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", model == "llama"))
        if "tokenizer.ggml.add_bos_token" in metadata:
            add_bos = bool(metadata["tokenizer.ggml.add_bos_token"])

        bos_id = _int_or_none(metadata, "tokenizer.ggml.bos_token_id", n)
        eos_id = _int_or_none(metadata, "tokenizer.ggml.eos_token_id", n)
        unk_id = _int_or_none(metadata, "tokenizer.ggml.unknown_token_id", n)
        if add_bos and bos_id is None:
            raise ModelFileError(f"The model asks for a BOS token but names none. {_FIX}")
        token_types, eog_ids = _llama_cpp_special_types(metadata, tokens, token_types, eos_id)

        lstrip_ids, rstrip_ids = _strip_attributes(metadata, tokens, token_types)
        specials = [
            (tokens[i], i, t in (CONTROL, UNKNOWN), i in lstrip_ids, i in rstrip_ids)
            for i, t in enumerate(token_types)
            if t in (CONTROL, USER_DEFINED, UNKNOWN)
        ]
        specials.sort(key=lambda s: (-len(s[0].encode("utf-8")), s[1]))

        if model == "gpt2":
            merges = metadata.get("tokenizer.ggml.merges")
            if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
                raise ModelFileError(f"The model's BPE merges (tokenizer.ggml.merges) are missing. {_FIX}")
            backend: object = _build_bpe(tokens, merges, regexes, ignore_merges)
        else:
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is not None and (not isinstance(scores, list) or len(scores) < n):
                raise ModelFileError(f"The model's token scores do not match its vocabulary. {_FIX}")
            backend = _build_sentencepiece(tokens, scores, token_types, unk_id, add_space_prefix)
        logger.info(
            "tokenizer: %s, %d tokens, pre=%s, bos=%s eos=%s add_bos=%s, %d special, eog=%s",
            model, n, pre, bos_id, eos_id, add_bos, len(specials), sorted(eog_ids),
        )  # fmt: skip
        return cls(
            model=model,
            tokens=tokens,
            token_types=token_types,
            bos_id=bos_id,
            eos_id=eos_id,
            eog_ids=frozenset(eog_ids),
            add_bos=add_bos,
            add_space_prefix=add_space_prefix,
            specials=specials,
            backend=backend,
        )

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids for `text`, equal to llama.cpp's `llama_tokenize(text, add_special, parse_special)`
        with add_special = `add_bos` for a model whose `add_bos` is set (no EOS is ever appended).
        `add_bos=True` always prepends BOS; for a prompt pass `add_bos=self.add_bos`, unless the
        rendered chat template already starts with the BOS text (Gemma's templates print it)."""
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ModelFileError("This model has no BOS token, so none can be added.")
            ids.append(self.bos_id)
        for fragment in self._split_special(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
            elif self.model == "gpt2":
                ids.extend(self._backend.encode(fragment, add_special_tokens=False).ids)
            else:
                ids.extend(self._backend.encode(fragment))
        return ids

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut `text` at special tokens the way llama.cpp's tokenizer_st_partition does."""
        if not text:
            return []
        fragments: list[str | int] = [text]
        if self._special_finder is None:
            return fragments
        found = {self._special_index[m.group(1)] for m in self._special_finder.finditer(text)}
        candidates = sorted(found.union(*(self._special_prefixes[k] for k in found)))
        for k in candidates:
            token_text, token_id, needs_parse_special, lstrip, rstrip = self._specials[k]
            if needs_parse_special and not parse_special:
                continue
            if token_text not in text:  # fragments are pieces of text: cheap test first
                continue
            out: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or token_text not in fragment:
                    out.append(fragment)
                    continue
                parts = fragment.split(token_text)
                for k, part in enumerate(parts):
                    if k > 0:
                        out.append(token_id)
                        if rstrip:
                            part = part.lstrip(_C_SPACE)
                    if k < len(parts) - 1 and lstrip:
                        part = part.rstrip(_C_SPACE)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    # -- decoding ------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to the output text; b"" for control and unused tokens."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        piece = self._piece_bytes[token_id]
        if piece is None:
            piece = self._piece_bytes[token_id] = self._compute_token_bytes(token_id)
        return piece

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`. Control tokens vanish; bytes that are not valid UTF-8 become U+FFFD.
        For SentencePiece vocabularies with a dummy prefix, the leading space it added is removed."""
        data = b"".join(self.token_bytes(i) for i in ids)
        if self.add_space_prefix and self.model == "llama" and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def _compute_token_bytes(self, token_id: int) -> bytes:
        text = self.tokens[token_id]
        kind = self.token_types[token_id]
        if kind == USER_DEFINED:
            return text.encode("utf-8")
        if kind == BYTE:
            match = _BYTE_TOKEN.fullmatch(text)
            return bytes([int(match.group(1), 16)]) if match else b""
        if kind != NORMAL:  # control, unknown, unused, undefined
            return b""
        if self.model == "llama":
            return text.replace(_SPM_SPACE, " ").encode("utf-8")
        out = bytearray()
        for ch in text:
            b = _UNICODE_TO_BYTE.get(ch)
            if b is None:
                out += ch.encode("utf-8")  # not a byte-level character: keep it as written
            else:
                out.append(b)
        return bytes(out)

    def vocab_fingerprint(self) -> str:
        """sha256 over the vocabulary's token texts in id order (length-prefixed, so unambiguous)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.model.encode("utf-8"))
            for token in self.tokens:
                data = token.encode("utf-8")
                h.update(struct.pack("<Q", len(data)))
                h.update(data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def token_text(self, token_id: int) -> str:
        """The token as written in the vocabulary (e.g. "<|im_end|>", "Ġthe", "▁the")."""
        return self.tokens[token_id]

    def token_id(self, text: str) -> int | None:
        """Id of the vocabulary entry written exactly `text`, or None."""
        if not hasattr(self, "_token_to_id"):
            self._token_to_id = {t: i for i, t in enumerate(self.tokens)}
        return self._token_to_id.get(text)


# ---------------------------------------------------------------------------------------------
# llama.cpp's special-token bookkeeping


def _llama_cpp_special_types(
    metadata: Mapping[str, object], tokens: list[str], token_types: list[int], eos_id: int | None
) -> tuple[list[int], set[int]]:
    """Re-type tokens by their text and collect end-of-generation ids, as llama.cpp's vocab loader does."""
    n = len(tokens)
    token_types = list(token_types)
    token_to_id: dict[str, int] = {}
    for i, t in enumerate(tokens):
        token_to_id[t] = i  # a duplicated text maps to its last id, as in llama.cpp

    def named(key: str) -> int | None:
        return _int_or_none(metadata, f"tokenizer.ggml.{key}", n)

    def find(texts: Sequence[str]) -> int | None:
        for t in texts:
            if t in token_to_id:
                return token_to_id[t]
        return None

    def make_control(token_id: int | None) -> None:
        if token_id is not None and token_types[token_id] != CONTROL:
            logger.debug(
                "token %d %r looks like a control token; typing it control", token_id, tokens[token_id]
            )
            token_types[token_id] = CONTROL

    eot_id = named("eot_token_id")
    if eot_id is None:
        eot_id = find(_EOT_TEXTS)
        make_control(eot_id)
    eom_id = named("eom_token_id")
    if eom_id is None:
        eom_id = find(_EOM_TEXTS)
        make_control(eom_id)
    fim: dict[str, int | None] = {}
    for key, texts in (
        ("fim_pre", _FIM_PRE_TEXTS),
        ("fim_suf", _FIM_SUF_TEXTS),
        ("fim_mid", _FIM_MID_TEXTS),
        ("fim_pad", _FIM_PAD_TEXTS),
        ("fim_rep", _FIM_REP_TEXTS),
        ("fim_sep", _FIM_SEP_TEXTS),
    ):
        fim[key] = named(f"{key}_token_id")
        if fim[key] is None:
            fim[key] = find(texts)
            make_control(fim[key])

    eog: set[int] = {fim[k] for k in ("fim_pad", "fim_rep", "fim_sep") if fim[k] is not None}
    for t in _EOG_TEXTS:
        if t in token_to_id:
            eog.add(token_to_id[t])
            make_control(token_to_id[t])
    for t in _ALWAYS_RENDERED:
        if t in token_to_id:
            token_types[token_to_id[t]] = USER_DEFINED
    for i in (eos_id, eot_id, eom_id):
        if i is not None:
            eog.add(i)
    texts = {tokens[i] for i in eog}
    # gpt-oss / solar-open: "<|end|>" ends a message, not the generation
    if "<|end|>" in texts and (
        ("<|return|>" in texts and texts & {"<|call|>", "<|calls|>"}) or {"<|calls|>", "<|flush|>"} <= texts
    ):
        end_id = token_to_id["<|end|>"]
        eog.discard(end_id)
        token_types[end_id] = USER_DEFINED
    # gemma4 / plamo: "</s>" is an ordinary token there
    if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:
        s_id = token_to_id["</s>"]
        eog.discard(s_id)
        token_types[s_id] = NORMAL
    return token_types, eog


def _strip_attributes(
    metadata: Mapping[str, object], tokens: list[str], token_types: list[int]
) -> tuple[set[int], set[int]]:
    """Per-model lstrip / rstrip flags on special tokens (llama.cpp sets them by model name)."""
    name = str(metadata.get("general.name", "")).lower()
    if "phi-3" in name or "phi3" in name:
        rstrip = {i for i, t in enumerate(token_types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
        rstrip |= {i for i, t in enumerate(tokens) if t == "</s>"}
        rstrip -= {i for i, t in enumerate(tokens) if t in ("<unk>", "<s>", "<|endoftext|>")}
        return set(), rstrip
    return set(), set()


# ---------------------------------------------------------------------------------------------
# backends


def _build_bpe(tokens: list[str], merges: list[str], regexes: tuple[str, ...], ignore_merges: bool) -> object:
    """A `tokenizers.Tokenizer` doing byte-level BPE with the given split regexes (no added tokens:
    special tokens never reach it)."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab[t] = i
    pairs: list[tuple[str, str]] = []
    dropped = 0
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut < 0:
            dropped += 1
            continue
        left, right = merge[:cut], merge[cut + 1 :]
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
        else:
            dropped += 1
    if dropped:
        logger.warning("ignored %d BPE merges whose tokens are not in the vocabulary", dropped)
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
        splitters = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splitters, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    except Exception as e:  # tokenizers raises plain Exceptions for malformed vocabularies
        raise ModelFileError(f"The model's BPE vocabulary could not be loaded ({e}). {_FIX}") from e
    return tok


class _SentencePieceBackend:
    """SentencePiece encoder over one raw fragment (special tokens already split off)."""

    def __init__(self, processor: object, n_tokens: int) -> None:
        self.processor = processor
        self.n_tokens = n_tokens

    def encode(self, text: str) -> list[int]:
        ids = self.processor.encode(text, out_type=int)
        # an id past the real vocabulary is the stand-in unknown piece (see _build_sentencepiece)
        return [i for i in ids if i < self.n_tokens]


def _build_sentencepiece(
    tokens: list[str],
    scores: list[float] | None,
    token_types: list[int],
    unk_id: int | None,
    add_space_prefix: bool,
) -> _SentencePieceBackend:
    """A SentencePiece BPE processor whose merges follow llama.cpp's SPM tokenizer.

    llama.cpp merges any adjacent pair whose concatenation is *some* vocabulary entry (by score,
    leftmost on ties) and falls back to byte tokens for what is left. SentencePiece does the same for
    NORMAL pieces, so every token except the byte tokens and the unknown piece is typed NORMAL here.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    n = len(tokens)
    if len(set(tokens)) != n:
        raise ModelFileError(f"The model's SentencePiece vocabulary has duplicate tokens. {_FIX}")
    byte_ids = {i for i, t in enumerate(token_types) if t == BYTE and _BYTE_TOKEN.fullmatch(tokens[i])}
    has_all_bytes = len({tokens[i].upper() for i in byte_ids}) == 256
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(token_types) if t == UNKNOWN), None)

    proto = sp_pb2.ModelProto()
    proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = n + (unk_id is None)
    proto.trainer_spec.byte_fallback = has_all_bytes
    proto.trainer_spec.unk_id = n if unk_id is None else unk_id
    proto.trainer_spec.bos_id = -1
    proto.trainer_spec.eos_id = -1
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    piece_type = sp_pb2.ModelProto.SentencePiece
    for i, text in enumerate(tokens):
        piece = proto.pieces.add()
        piece.piece = text
        piece.score = float(scores[i]) if scores is not None else 0.0
        if i == unk_id:
            piece.type = piece_type.UNKNOWN
        elif i in byte_ids and has_all_bytes:
            piece.type = piece_type.BYTE
        else:
            piece.type = piece_type.NORMAL
    if unk_id is None:  # SentencePiece insists on an unknown piece; this one is never produced
        piece = proto.pieces.add()
        piece.piece = "<tandem-unk>"
        piece.type = piece_type.UNKNOWN
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto.SerializeToString())
    except Exception as e:  # sentencepiece raises RuntimeError / OSError with its own message
        raise ModelFileError(f"The model's SentencePiece vocabulary could not be loaded ({e}). {_FIX}") from e
    return _SentencePieceBackend(processor, n)
