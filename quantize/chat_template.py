"""A checkpoint's chat template: read from its files, rendered as transformers renders it, and matched
against the prompt formats the release's presets carry (:data:`quantize.recipe.PROMPT_FORMATS`).

A template is recognised by rendering: a multi-turn conversation with a system message, rendered by
the template and by each known format's turn table, must give the same string (less the BOS text the
template writes, which llama.cpp adds as a token).  A template no row renders is split into a turn
table of its own by rendering conversations whose messages are unique markers; that table is kept
only when it renders the template's own strings back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os.path import commonprefix
from pathlib import Path
from typing import Any

from quantize.errors import QuantizeError
from quantize.formats.checkpoint import read_json_object
from quantize.recipe import PROMPT_FORMATS, PromptFormat, render_chat

# transformers is imported only to render (its jinja environment, seconds to import).

Messages = list[dict[str, str]]
TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# the conversation a template is recognised by: a system message, then three user turns and two replies
PROBE: Messages = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two is the only even prime."},
    {"role": "user", "content": "Thank you."},
]


def _markers(roles: list[str]) -> Messages:
    return [{"role": r, "content": f"\u27e6{r[0].upper()}{i}\u27e7"} for i, r in enumerate(roles)]


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    where: Path  # the file it was read from
    tokens: Mapping[str, str]  # bos_token, eos_token, ... as the tokenizer's config names them

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The template's string for ``messages``, less the BOS text it writes first."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            tokens: dict[str, Any] = dict(self.tokens)
            out = render_jinja_template([messages], chat_template=self.text, add_generation_prompt=add_generation_prompt,
                                        **tokens)[0][0]
        except Exception as exc:  # jinja's errors and the template's own raise_exception
            raise QuantizeError(self.where, f"the chat template does not render this conversation ({exc})") from exc
        bos = self.tokens.get("bos_token")
        return out[len(bos):] if bos and out.startswith(bos) else out

    def renders(self, messages: Messages) -> str | None:
        """:meth:`render`, or None where the template refuses the conversation (a system message, say)."""
        try:
            return self.render(messages)
        except QuantizeError:
            return None

    def renders_past(self, messages: Messages) -> str | None:
        """A finished conversation (no generation prompt), or None where the template refuses it."""
        try:
            return self.render(messages, add_generation_prompt=False)
        except QuantizeError:
            return None


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def read_chat_template(folder: Path) -> ChatTemplate | None:
    """The chat template of checkpoint (or adapter) ``folder``: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (the one named ``default`` when it lists several);
    None when it has none."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = read_json_object(cfg_path) if cfg_path.is_file() else {}
    tokens = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config's own names win
        if (folder / name).is_file():
            data = read_json_object(folder / name)
            tokens.update({k: t for k in TOKEN_KEYS if (t := _token(data.get(k)))})
    if (folder / "chat_template.jinja").is_file():
        return ChatTemplate((folder / "chat_template.jinja").read_text(encoding="utf-8"), folder / "chat_template.jinja", tokens)
    text = cfg.get("chat_template")
    if isinstance(text, list):
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    if not isinstance(text, str) or not text.strip():
        return None
    return ChatTemplate(text, cfg_path, tokens)


@dataclass(frozen=True)
class Recognised:
    name: str | None  # a PROMPT_FORMATS row, or None for a turn table read from the template itself
    fmt: PromptFormat
    note: str  # how the template and the format agree


def recognise(t: ChatTemplate) -> Recognised | None:
    """The prompt format that renders ``t``'s strings (see the module's docstring), or None."""
    full, bare = t.renders(PROBE), t.renders(PROBE[1:])
    for name, fmt in PROMPT_FORMATS.items():
        if full is not None and full == render_chat(fmt.turns, PROBE):
            return Recognised(name, fmt, "renders the template's string for a multi-turn chat with a system message")
    for name, fmt in PROMPT_FORMATS.items():
        if bare is not None and bare == render_chat(fmt.turns, PROBE[1:]):
            how = "refuses a system message" if full is None else "folds the system message into the first user turn"
            return Recognised(name, fmt, f"renders the template's string for a multi-turn chat; the template {how}, "
                              "the presets send the system text as a turn of its own (as koboldcpp's adapter does)")
    derived = derive_format(t)
    if derived is None:
        return None
    return Recognised(None, derived, "turns read from the template; they render its string for a multi-turn chat with a system message")


def _cut(text: str, contents: list[str]) -> list[str] | None:
    """The text between the message contents of a rendering, in order, or None when a content is missing."""
    parts, rest = [], text
    for c in contents:
        i = rest.find(c)
        if i < 0:
            return None
        parts.append(rest[:i])
        rest = rest[i + len(c):]
    return [*parts, rest]


def _common_suffix(texts: list[str]) -> str:
    return commonprefix([s[::-1] for s in texts])[::-1]


def derive_format(t: ChatTemplate) -> PromptFormat | None:
    """A turn table read from ``t`` by rendering marker messages, when it renders ``t``'s strings back."""
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    full, bare = _markers(roles), _markers(roles[1:])
    r_full, r_bare = t.renders(full), t.renders(bare)
    if r_full is None or r_bare is None:
        return None
    p, q = _cut(r_full, [m["content"] for m in full]), _cut(r_bare, [m["content"] for m in bare])
    if p is None or q is None or p[2] != p[4] or p[3] != p[5]:
        return None
    user_start = _common_suffix([p[1], p[3], q[0]])
    assistant_end = p[3][: len(p[3]) - len(user_start)]
    system_end = p[1][: len(p[1]) - len(user_start)]
    chat_start = q[0][: len(q[0]) - len(user_start)]
    if not p[0].startswith(chat_start):
        return None
    # what closes a user turn: the text that closes the other roles' turns where it does, else what a reply and
    # the generation prompt share
    user_end = next((e for e in (assistant_end, system_end) if e and p[2].startswith(e) and p[6].startswith(e)),
                    commonprefix([p[2], p[6]]))
    turns = {"system_start": p[0][len(chat_start):], "system_end": system_end, "user_start": user_start, "user_end": user_end,
             "assistant_start": p[2][len(user_end):], "assistant_end": assistant_end}
    if p[6][len(user_end):] != turns["assistant_start"]:
        turns["assistant_gen"] = p[6][len(user_end):]
    if chat_start:
        turns["chat_start"] = chat_start
    if not user_start.strip() or not turns.get("assistant_gen", turns["assistant_start"]).strip():
        return None  # a turn must open with text of its own, or a front end cannot tell the roles apart
    stop = assistant_end.strip() or t.tokens.get("eos_token", "")
    if not stop:
        return None  # nothing would end a reply
    fmt = PromptFormat((stop,), turns)
    checks = (PROBE, PROBE[1:], PROBE[:4], PROBE[:2])
    if any(t.renders(m) != render_chat(turns, m) for m in checks):
        return None
    return fmt


def render_conversation(t: ChatTemplate | None, fallback: PromptFormat) -> Callable[[Messages], str]:
    """A function rendering a whole conversation (system message first, ending with a reply) with the chat
    template ``t``; a template that refuses a system message gets it at the head of the first user message;
    ``fallback``'s turns render it where there is no template."""

    def render(messages: Messages) -> str:
        if t is None:
            return render_chat(fallback.turns, messages) + fallback.turns["assistant_end"]
        out = t.renders_past(messages)
        if out is None and messages and messages[0]["role"] == "system" and len(messages) > 1:
            head = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            out = t.renders_past([head, *messages[2:]])
        if out is None:
            raise QuantizeError(t.where, "the chat template refuses a plain system/user/assistant conversation")
        return out

    return render
