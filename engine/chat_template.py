"""Render a conversation into the prompt text a model was trained on, from the GGUF's
`tokenizer.chat_template` (a Jinja template, as on the Hugging Face Hub).

A template comes from a downloaded file, so it is untrusted code: it runs in jinja2's immutable
sandbox, and any attempt to reach an unsafe attribute (`__class__`, `__globals__`, `mro`, ...) stops
the render with a ModelFileError instead of yielding a silent empty value. The environment matches
what `transformers.apply_chat_template` gives templates (trim_blocks, lstrip_blocks, loop controls,
a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`, the special-token strings),
so the rendered text is the same as transformers' for the same template and messages.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from engine.errors import ModelFileError, TandemError

logger = logging.getLogger(__name__)

# Used when the file carries no template: ChatML, the format of Qwen, SmolLM and many others.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Used instead of ChatML when the vocabulary has Gemma's turn markers (a system prompt goes in
# front of the first user turn, the way Gemma's own template places it). No BOS text: the
# tokenizer adds BOS when the model asks for it.
GEMMA_TURNS_TEMPLATE = (
    "{%- set ns = namespace(system='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system = ns.system + message['content'] + '\\n\\n' %}"
    "{%- else %}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if message['role'] == 'user' %}{{- ns.system }}{%- set ns.system = '' %}{%- endif %}"
    "{{- message['content'] + '<end_of_turn>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
    just outputs the body (transformers does the same when it is not collecting masks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _StrictSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute access raises at once (the stock sandbox hands
    back an Undefined that only raises when used, so `{{ x.__class__ }}` would print nothing)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.sandbox.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe"
        )


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so templates cannot plant dunder attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.sandbox.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    return env


_SPECIAL_TOKEN_KEYS = (
    ("bos_token", "tokenizer.ggml.bos_token_id"),
    ("eos_token", "tokenizer.ggml.eos_token_id"),
    ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ("sep_token", "tokenizer.ggml.seperator_token_id"),  # sic: the GGUF key is spelled this way
    ("pad_token", "tokenizer.ggml.padding_token_id"),
    ("cls_token", "tokenizer.ggml.cls_token_id"),
    ("mask_token", "tokenizer.ggml.mask_token_id"),
)


def _special_token_strings(metadata: Mapping[str, object], tokenizer: Any) -> dict[str, str]:
    """bos_token, eos_token, ... as the texts templates print (transformers passes the same names)."""
    out: dict[str, str] = {}
    vocab_size = getattr(tokenizer, "vocab_size", 0)
    for name, key in _SPECIAL_TOKEN_KEYS:
        token_id = metadata.get(key)
        if isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < vocab_size:
            out[name] = tokenizer.token_text(token_id)
    return out


class ChatTemplate:
    """A compiled, sandboxed chat template. `render(messages)` returns the prompt text."""

    def __init__(
        self, source: str, special_tokens: Mapping[str, str] | None = None, origin: str = "file"
    ) -> None:
        self.source = source
        self.origin = origin  # "file", or the name of the fallback used
        self.sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ModelFileError(
                f"The model's chat template is broken (line {e.lineno}: {e.message}). "
                "Pick another model file."
            ) from e

    @classmethod
    def from_gguf(cls, gguf_file: object, tokenizer: Any) -> ChatTemplate:
        """The file's `tokenizer.chat_template`; without one, ChatML (or Gemma turns when the
        vocabulary has <start_of_turn>/<end_of_turn>), which is logged."""
        metadata = getattr(gguf_file, "metadata", gguf_file)
        if not isinstance(metadata, Mapping):
            raise TypeError(
                "from_gguf needs an object with a .metadata dict (engine.gguf_file.GGUFModelFile)"
            )
        source = metadata.get("tokenizer.chat_template")
        special = _special_token_strings(metadata, tokenizer)
        if isinstance(source, str) and source.strip():
            return cls(source, special, origin="file")
        if (
            tokenizer.token_id("<start_of_turn>") is not None
            and tokenizer.token_id("<end_of_turn>") is not None
        ):
            logger.warning("the model file has no chat template; using Gemma turn markers")
            return cls(GEMMA_TURNS_TEMPLATE, special, origin="gemma-turns fallback")
        logger.warning("the model file has no chat template; using ChatML")
        return cls(CHATML_TEMPLATE, special, origin="chatml fallback")

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
        plain = [dict(m) for m in messages]  # the template never sees (or keeps) the caller's objects
        try:
            return self._template.render(
                messages=plain,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.sandbox.SecurityError as e:
            raise ModelFileError(
                f"The model's chat template tried something unsafe and was stopped ({e}). "
                "Pick another model file."
            ) from e
        except jinja2.TemplateError as e:
            # raise_exception(...) in a template: the conversation does not fit the template's rules
            raise TandemError(f"The model's chat template rejected this conversation: {e}") from e
        except Exception as e:  # a template can fail in many ways (type errors on odd content, ...)
            raise TandemError(
                f"The model's chat template failed on this conversation ({type(e).__name__}: {e})"
            ) from e
