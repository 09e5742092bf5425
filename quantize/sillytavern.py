"""SillyTavern's "Advanced Formatting" for a release: ``<Model>.SillyTavern.json``, the recipe's prompt format as
an instruct template, a context template and its system prompt, in the form SillyTavern's master import
(Advanced Formatting, "Master Import") takes in one step: a JSON object whose ``instruct``, ``context`` and
``sysprompt`` members are each a template of that kind, all three named after the recipe.

Everything is derived from the prompt format's turn table (:data:`quantize.recipe.PROMPT_FORMATS`), the way
SillyTavern's instruct mode (``public/scripts/instruct-mode.js``) assembles a text-completion prompt:

* each chat message is ``<sequence><message><suffix>`` (``input_*`` for the user, ``output_*`` for the
  character, ``system_*`` for a narrator/system message), the reply is opened with ``last_output_sequence``
  (or ``output_sequence``), the turn's ``assistant_gen`` where the format has one;
* the system prompt goes into the context template's story string, which instruct mode wraps in
  ``story_string_prefix`` and ``story_string_suffix`` (the format's system turn);
* with ``wrap`` SillyTavern adds the newlines itself: one between a sequence and the message, one closing a
  message whose suffix is empty, and it writes each stop line as ``"\\n" + line``.  ``wrap`` is chosen only
  where it reproduces the turn table exactly and makes every stop string exact (each starts with a newline,
  as Alpaca's ``"\\n### Instruction"``); otherwise the sequences are the turn strings verbatim, ``wrap`` off.

``stop_sequence`` is one string that SillyTavern splits into lines, one stop string each (blank lines
dropped): a stop string with a newline inside can only be given as its lines, a wider stop
(tests/test_sillytavern.py names the formats where that happens).  Character names are not added to messages
(``names_behavior`` "none") nor used as stop strings, so the prompt and stops are the format's own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantize.atomic import atomic_file
from quantize.recipe import Recipe

SUFFIX = ".SillyTavern.json"

# The turn table's roles -> SillyTavern's instruct-template fields for that role's message: (sequence, suffix).
ROLE_FIELDS: dict[str, tuple[str, str]] = {
    "user": ("input_sequence", "input_suffix"),
    "assistant": ("output_sequence", "output_suffix"),
    "system": ("system_sequence", "system_suffix"),
}

# SillyTavern's current default story string (default/content/presets/context/Default.json, Gemma 4.json): the system
# prompt, then what a character card, world info, the persona and extension anchors add; ``{{trim}}`` drops
# the newline after the last part, so a lone system prompt is exactly the format's system turn.
STORY_STRING = (
    "{{#if anchorBefore}}{{anchorBefore}}\n{{/if}}{{#if system}}{{system}}\n{{/if}}"
    "{{#if wiBefore}}{{wiBefore}}\n{{/if}}{{#if description}}{{description}}\n{{/if}}"
    "{{#if personality}}{{personality}}\n{{/if}}{{#if scenario}}{{scenario}}\n{{/if}}"
    "{{#if wiAfter}}{{wiAfter}}\n{{/if}}{{#if persona}}{{persona}}\n{{/if}}"
    "{{#if anchorAfter}}{{anchorAfter}}\n{{/if}}{{trim}}"
)


def _reply_opener(turns: Mapping[str, str]) -> str:
    return turns.get("assistant_gen", turns["assistant_start"])


def _wraps_exactly(turns: Mapping[str, str]) -> bool:
    """Whether SillyTavern's ``wrap`` reproduces the turn table with each start's final newline taken off:
    every start is empty or ends with a newline, every end does (the last message's is dropped before the
    reply line, which wrap writes as newline + opener without trailing whitespace + newline)."""
    opener = _reply_opener(turns)
    return (all(turns[f"{r}_start"] == "" or turns[f"{r}_start"].endswith("\n") for r in ROLE_FIELDS)
            and all(turns[f"{r}_end"].endswith("\n") for r in ROLE_FIELDS)
            and (opener == "" or (opener.endswith("\n") and opener[:-1] != "" and opener[:-1] == opener[:-1].rstrip())))


def _stop_lines(stops: tuple[str, ...] | list[str], wrap: bool) -> list[str]:
    """``stop_sequence``'s lines: SillyTavern makes each non-blank line a stop string (``"\\n" + line`` under wrap)."""
    lines: list[str] = []
    for stop in stops:
        for line in (stop[1:] if wrap else stop).split("\n"):
            if line.strip() and line not in lines:
                lines.append(line)
    return lines


def sillytavern_preset(recipe: Recipe) -> dict[str, Any]:
    """The master-import object of ``recipe``'s prompt format, stop strings and system prompt."""
    card = recipe.card
    turns = card.format.turns
    stops = list(card.stop or card.format.stop)
    wrap = _wraps_exactly(turns) and all(s.startswith("\n") and "\n" not in s[1:] and s[1:].strip() for s in stops)

    def seq(text: str) -> str:  # a start as SillyTavern's sequence field: wrap adds its final newline back
        return text[:-1] if wrap and text else text

    instruct: dict[str, Any] = {}
    for role, (seq_field, suffix_field) in ROLE_FIELDS.items():
        instruct[seq_field] = seq(turns[f"{role}_start"])
        instruct[suffix_field] = turns[f"{role}_end"]
    opener = _reply_opener(turns)
    instruct.update({
        "first_output_sequence": "",
        "last_output_sequence": seq(opener) if opener != turns["assistant_start"] else "",
        "first_input_sequence": "",
        "last_input_sequence": "",
        "last_system_sequence": "",
        "story_string_prefix": seq(turns["system_start"]),
        "story_string_suffix": turns["system_end"],
        "stop_sequence": "\n".join(_stop_lines(stops, wrap)),
        "sequences_as_stop_strings": False,
        "wrap": wrap,
        "macro": True,
        "names_behavior": "none",
        "activation_regex": "",
        "skip_examples": False,
        "user_alignment_message": "",
        "system_same_as_user": False,
        "name": recipe.name,
    })
    context = {
        "story_string": STORY_STRING,
        "example_separator": "",
        "chat_start": "",
        "use_stop_strings": False,
        "names_as_stop_strings": False,
        "story_string_position": 0,  # in the prompt, before the chat (not injected in-chat)
        "story_string_depth": 1,
        "story_string_role": 0,
        "always_force_name2": True,
        "trim_sentences": False,
        "single_line": False,
        "name": recipe.name,
    }
    sysprompt = {"name": recipe.name, "content": card.system, "post_history": ""}
    return {"instruct": instruct, "context": context, "sysprompt": sysprompt}


def write_sillytavern(root: Path, stem: str, recipe: Recipe) -> Path:
    """Write ``<stem>.SillyTavern.json`` into ``root`` (atomically) and return its path."""
    path = Path(root) / (stem + SUFFIX)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(sillytavern_preset(recipe), indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
