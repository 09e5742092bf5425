"""koboldcpp presets as koboldcpp uses them: each shipped recipe's chat-completions adapter rendered for a
multi-turn conversation with a system message, compared with the prompt format its model was trained on
(the seed release cards' strings; Gemma 3's own chat template)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from quantize.errors import QuantizeError
from quantize.recipe import PROMPT_FORMATS, load_recipe, render_chat

U1, A1, U2 = "Who goes there?", "Nay, answer me: stand, and unfold yourself.", "Long live the king!"


def _conversation(system: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]


# The formats as the seed cards print them, with the recipe's system prompt and our utterances filled in.
# AshhLimaRP-Mistral-7B's card ("Prompt format", "Message length control"): "### Input:" before user
# inputs (its second example turn drops the colon, against its own description), past replies
# "Character: {utterance}", and the length modifier on the response being generated only.
ALPACA_EXTENDED_SEED = (
    "### Instruction:\n"
    "Character's Persona: {bot character description}\n\n"
    "User's Persona: {user character description}\n\n"
    "Scenario: {what happens in the story}\n\n"
    "Play the role of Character. You must engage in a roleplaying chat with User below this line. "
    "Do not write dialogues and narration for User.\n\n"
    f"### Input:\nUser: {U1}\n\n"
    f"### Response:\nCharacter: {A1}\n\n"
    f"### Input:\nUser: {U2}\n\n"
    "### Response: (length = medium)\nCharacter:"
)


def _chatml_seed(system: str) -> str:
    """Dolphin's card: ChatML, each turn ``<|im_start|>{role}\\n{text}<|im_end|>\\n``, the reply opened by
    ``<|im_start|>assistant\\n``."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
            f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n")


RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_adapter_renders_the_models_prompt_format(recipe: Path, request: pytest.FixtureRequest) -> None:
    r = load_recipe(recipe)
    turns = PROMPT_FORMATS[r.card.prompt_format].turns
    system = r.card.system or "You are a player in a Shakespeare company."
    got = render_chat(turns, _conversation(system))
    if r.card.prompt_format == "alpaca-extended":
        assert system == ALPACA_EXTENDED_SEED.split("\n", 1)[1].split("\n\n### Input:")[0]  # the card's own persona block
        assert got == ALPACA_EXTENDED_SEED
    elif r.card.prompt_format == "chatml":
        assert got == _chatml_seed(system)
    elif r.card.prompt_format == "gemma":
        _check_gemma(turns, system, request.getfixturevalue("gemma3"))
    else:
        pytest.fail(f"{recipe.name}: no reference for prompt format {r.card.prompt_format}")


def _check_gemma(turns: dict[str, str], system: str, gemma3: Path) -> None:
    """Gemma 3's own template (transformers' apply_chat_template on the checkpoint's tokenizer_config)
    merges a system message into the first user turn; koboldcpp's adapters (kcpp_adapters/Gemma*.json,
    and AutoGuess's Gemma 3 entry) give it a user turn of its own instead. So: without a system message the
    render is the model's template exactly; with one, it is a closed turn in the model's turn syntax
    followed by exactly that."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3)
    no_system = _conversation("")
    hf = tok.apply_chat_template(no_system, tokenize=False, add_generation_prompt=True)
    assert hf.startswith(tok.bos_token)  # the backend adds BOS itself
    hf = hf.removeprefix(tok.bos_token)
    assert render_chat(turns, no_system) == hf
    with_system = render_chat(turns, _conversation(system))
    assert with_system == f"<start_of_turn>user\n{system}<end_of_turn>\n" + hf
    # every turn is closed before the next opens (no second <start_of_turn>user inside the first)
    opened = 0
    for piece in with_system.split("<"):
        opened += piece.startswith("start_of_turn>") - piece.startswith("end_of_turn>")
        assert opened in (0, 1)
    hf_system = tok.apply_chat_template(_conversation(system), tokenize=False, add_generation_prompt=True)
    assert system in hf_system and hf_system.endswith("<start_of_turn>model\n")


def test_continuing_a_reply_renders_no_generation_prompt() -> None:
    """A conversation ending with the assistant's message is continued, as koboldcpp does by default:
    the past reply's opening, without the length modifier of a new one, and no closing."""
    turns = PROMPT_FORMATS["alpaca-extended"].turns
    got = render_chat(turns, [{"role": "user", "content": U1}, {"role": "assistant", "content": "Nay"}])
    assert got == f"### Input:\nUser: {U1}\n\n### Response:\nCharacter: Nay"


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "-bad/name", "owner/", "owner/na me"])
def test_recipe_hub_repo_must_be_a_repo_id(tmp_path: Path, repo: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f'name = "X"\nbase = "demo:mistral-spm"\nhub_repo = "{repo}"\n')
    with pytest.raises(QuantizeError, match="is not a Hugging Face repo id") as e:
        load_recipe(path)
    assert str(path) in str(e.value)
    path.write_text('name = "X"\nbase = "demo:mistral-spm"\nhub_repo = "my-org/X-GGUF"\n')
    assert load_recipe(path).hub_repo == "my-org/X-GGUF"
