"""The release: a whole demo recipe built once, then checked the way a downloader would; incremental
rebuilds, a SIGKILL midway, tampered downloads and bad recipes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_ROOT, ROOT
from kill import BuildStep, cli, killed_then_rerun

from quantize.errors import QuantizeError
from quantize.formats.gguf_read import open_gguf
from quantize.models.demo import Demo
from quantize.pipeline import build_release
from quantize.release import verify


def _recipe(tmp: Path, demo: Demo, ladder: str = "", **over: str) -> Path:
    """A small recipe (no AWQ) whose evaluation text is a private copy the test may touch."""
    eval_copy = tmp / "eval.txt"
    if not eval_copy.exists():
        shutil.copyfile(demo.text["eval"], eval_copy)
    fields = {"name": "Tiny", "base": "demo:mistral-spm", "calibration": "demo:calib", "evaluation": str(eval_copy), **over}
    body = "\n".join(f'{k} = "{v}"' for k, v in fields.items())
    body += f'\n[ladder]\ngguf = ["F16", "Q4_K_M"]\nawq = false\n{ladder}[card]\nprompt_format = "chatml"\ncontext = 1024\n'
    path = tmp / "tiny.toml"
    path.write_text(body)
    return path


def test_demo_release_is_complete_and_verifies(release) -> None:  # type: ignore[no-untyped-def]
    root = release.root
    manifest = json.loads((root / "manifest.json").read_text())
    kinds = [a["kind"] for a in manifest["artifacts"]]
    assert kinds == ["F16", "Q6_K", "Q4_K_M", "Q4_K_M-mix", "imatrix", "SillyTavern", "AWQ"]
    assert all(a["verdict"] == "pass" for a in manifest["artifacts"] if a["kind"] not in ("imatrix", "SillyTavern"))
    assert verify(root).ok
    assert manifest["tools"]["llama-cpp-python"] and manifest["evaluation_text_sha256"]
    assert manifest["sources"] == {"base": {"spec": "demo:mistral-spm", "pinned": None, "commit": None},
                                   "lora": {"spec": "demo:lora", "pinned": None, "commit": None}}
    # The merge happened: the release was built from base + LoRA.
    assert "merge" in release.ladder.log.built
    # sha256sum's own format
    sums = (root / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == sum(len(a["files"]) for a in manifest["artifacts"]) + 1  # + the card
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=root).returncode == 0


def test_card_table_matches_manifest(release) -> None:  # type: ignore[no-untyped-def]
    root = release.root
    card = (root / "README.md").read_text()
    manifest = json.loads((root / "manifest.json").read_text())
    assert card.startswith("---\nbase_model: ") and "quantized_by: quantize" in card and "license: apache-2.0" in card
    assert "## Available versions" in card and "<|im_start|>system" in card and "koboldcpp" in card
    # the gate's summary comes from the verdicts; the koboldcpp section names its minimum version and the folder
    assert "Every file passed its threshold (5 of 5)." in card  # F16, Q6_K, Q4_K_M, its searched mix, AWQ
    assert "Needs koboldcpp 1.107 or newer" in card
    assert ("Calibration text (importance matrix, smoothing, AWQ): Shakespeare, Twelfth Night and Julius Caesar (public "
            "domain). Evaluation text (the quality gate): Shakespeare, Hamlet and The Tempest (public domain).") in card
    assert "cd /path/to/the/files && koboldcpp --config Demo-Mistral-ChatML.Q4_K_M.kcpps" in card
    rows = [ln for ln in card.splitlines() if ln.startswith("| Demo-Mistral-ChatML")]
    versions = [a for a in manifest["artifacts"] if a["kind"] not in ("imatrix", "SillyTavern")]  # listed, not versions
    for row, a in zip(rows, versions, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].rstrip("/") == (a["files"][0]["name"] if a["kind"] not in ("AWQ",) else a["files"][0]["name"].split("/")[0])
        assert cells[3] == f"{a['size'] / 2**30:.2f} GiB"
        if a["quality"]:
            assert cells[6] == f"{a['quality']['mean_kld']:.5f}"


def test_koboldcpp_presets_name_existing_ggufs(release) -> None:  # type: ignore[no-untyped-def]
    """A .kcpps settings file and a .kcppt launch template beside each GGUF, both listed in the manifest."""
    root = release.root
    manifest = json.loads((root / "manifest.json").read_text())
    listed = {f["name"] for a in manifest["artifacts"] for f in a["files"]}
    gen_defaults = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "rep_pen": 1.1,
                    "stop_sequence": ["<|im_end|>"], "stop": ["<|im_end|>"]}
    for suffix in (".kcpps", ".kcppt"):
        presets = sorted(root.glob(f"*{suffix}"))
        assert len(presets) == 4 and {p.name for p in presets} <= listed  # F16, Q6_K, Q4_K_M and its mix
        for p in presets:
            preset = json.loads(p.read_text())
            assert p.name == preset["model_param"].removesuffix(".gguf") + suffix  # no hub_repo: the file name
            assert (root / preset["model_param"]).is_file()
            assert preset["contextsize"] == 2048
            assert preset["chatcompletionsadapter"]["user_start"] == "<|im_start|>user\n"
            assert preset["chatcompletionsadapter"]["assistant_end"] == "<|im_end|>\n"
            # koboldcpp's API reads stop_sequence; its OpenAI-compatible endpoints replace it with "stop"
            assert json.loads(preset["gendefaults"]) == gen_defaults
            if suffix == ".kcppt":  # what koboldcpp's --exporttemplate resets: no device-specific settings
                assert preset["istemplate"] is True and preset["gpulayers"] == -1 and preset["threads"] == -1
                assert all(preset[k] is None for k in ("usecuda", "usevulkan", "useclblast", "usecpu", "tensor_split"))
            else:
                assert "istemplate" not in preset


def test_card_summary_follows_the_verdicts() -> None:
    from quantize.release import quality_summary

    manifest = {"artifacts": [{"kind": "F16", "verdict": "pass"}, {"kind": "imatrix", "verdict": "not measured"},
                              {"kind": "Q6_K", "verdict": "not measured"}, {"kind": "Q4_K_M", "verdict": "fail"}]}
    assert quality_summary(manifest) == ("F16 passed its threshold. Q6_K was not measured. "
                                         "Q4_K_M failed its threshold.")
    manifest["artifacts"] = manifest["artifacts"][:2]
    assert quality_summary(manifest) == "Every file passed its threshold (1 of 1)."


def test_large_ggufs_ship_as_llama_cpp_split_shards(demo: Demo, tmp_path: Path) -> None:
    """With a 20 MB cap the 40 MB F16 ships as gguf-split shards that llama.cpp loads from the first
    file with the same logits; the 14 MB Q4_K_M stays whole."""
    import numpy as np
    from conftest import load_llama

    rel = build_release(_recipe(tmp_path, demo, ladder="split_max_gb = 0.02\n", hub_repo="my-org/Tiny-GGUF"), tmp_path / "s",
                        demo_root=DEMO_ROOT)
    manifest = json.loads((rel.root / "manifest.json").read_text())
    files = {a["kind"]: [f["name"] for f in a["files"] if f["name"].endswith(".gguf")] for a in manifest["artifacts"]}
    assert files["Q4_K_M"] == ["Tiny.Q4_K_M.gguf"]
    n = len(files["F16"])
    assert n >= 2 and files["F16"] == [f"Tiny.F16-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert all((rel.root / f).stat().st_size <= 20_000_000 for f in files["F16"])
    assert verify(rel.root).ok
    # Every shard belongs to an entry with its artifact's type, quality figures and verdict: the gate's.
    gate = {r["kind"]: r for r in json.loads(rel.ladder.report["json"].read_text())["results"]}
    for a in manifest["artifacts"]:
        if a["kind"] in gate:
            assert a["verdict"] == "pass" and a["quality"]["ppl_ratio"] == gate[a["kind"]]["ppl_ratio"], a["kind"]
            assert a["quality"]["mean_kld"] == gate[a["kind"]]["mean_kld"]
    card = (rel.root / "README.md").read_text()
    assert "Every file passed its threshold (2 of 2)." in card
    preset = json.loads((rel.root / "Tiny.F16.kcpps").read_text())
    assert preset["model_param"] == files["F16"][0]
    template = json.loads((rel.root / "Tiny.F16.kcppt").read_text())
    assert template["model_param"] == f"https://huggingface.co/my-org/Tiny-GGUF/resolve/main/{files['F16'][0]}"
    assert "koboldcpp --config https://huggingface.co/my-org/Tiny-GGUF/resolve/main/Tiny.Q4_K_M.kcppt" in card
    assert f"| {files['F16'][0]} (+{n - 1} more parts) |" in card
    whole, split = (load_llama(p, logits_all=True) for p in (rel.ladder.f16, rel.root / files["F16"][0]))
    toks = whole.tokenize(b"Now is the winter of our discontent")
    whole.eval(toks)
    split.eval(toks)
    assert np.array_equal(np.asarray(whole.scores[: len(toks)]), np.asarray(split.scores[: len(toks)]))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_release_files_get_the_mode_of_plain_files_under_the_umask(demo: Demo, tmp_path: Path, umask: int) -> None:
    """Every file and folder of a release (GGUFs, split shards, presets, imatrix, the AWQ folder, manifest,
    card) has the mode open() and mkdir() give under the umask: 0644/0755 under 0022."""
    recipe = _recipe(tmp_path, demo, ladder="split_max_gb = 0.02\n")
    recipe.write_text(recipe.read_text().replace("awq = false\n", "awq = true\nawq_samples = 8\nawq_seq_len = 128\n")
                      + "[thresholds]\nAWQ = { ppl_ratio = 10.0, mean_kld = 10.0 }\n")  # modes are the point here, not quality
    old = os.umask(umask)
    try:
        rel = build_release(recipe, tmp_path / "m", demo_root=DEMO_ROOT)
    finally:
        os.umask(old)
    entries = [rel.root, *rel.root.rglob("*")]
    assert any(p.is_dir() for p in entries[1:]) and any("-00001-of-" in p.name for p in entries)  # the AWQ folder, shards
    modes = {str(p.relative_to(rel.root)): stat.S_IMODE(p.stat().st_mode) for p in entries}
    assert modes == {str(p.relative_to(rel.root)): (0o777 if p.is_dir() else 0o666) & ~umask for p in entries}


def test_split_shards_keep_metadata_and_tensors_exactly(bpe_f16: Path, tmp_path: Path) -> None:
    from quantize.formats.gguf_split import split_gguf

    shards = split_gguf(bpe_f16, tmp_path, int(bpe_f16.stat().st_size * 0.6))
    src = open_gguf(bpe_f16)
    readers = [open_gguf(s) for s in shards]
    split_keys = {"split.no", "split.count", "split.tensors.count"}
    assert [int(r.fields["split.no"].contents()) for r in readers] == list(range(len(shards)))
    assert {k for k in readers[0].fields if not k.startswith("GGUF.")} - split_keys == {k for k in src.fields if not k.startswith("GGUF.")}
    for k, f in src.fields.items():
        if not k.startswith("GGUF."):
            assert readers[0].fields[k].contents() == f.contents(), k
    out = {t.name: t for r in readers for t in r.tensors}
    assert list(out) == [t.name for t in src.tensors]
    for t in src.tensors:
        assert out[t.name].tensor_type == t.tensor_type and bytes(out[t.name].data) == bytes(t.data), t.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_split_refuses_a_limit_below_one_tensor(bpe_f16: Path, tmp_path: Path) -> None:
    from quantize.formats.gguf_split import split_gguf

    with pytest.raises(QuantizeError, match=r"tensor token_embd.weight alone \(\d+ bytes\) exceeds the split size") as e:
        split_gguf(bpe_f16, tmp_path, 2_000_000)
    assert str(bpe_f16) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_second_run_rebuilds_nothing(release, demo: Demo) -> None:  # type: ignore[no-untyped-def]
    again = build_release(ROOT / "recipes" / "demo.toml", release.root.parent.parent, demo_root=DEMO_ROOT)
    assert again.ladder.log.built == []
    assert "eval" in again.ladder.log.reused and "release" in again.ladder.log.reused


def test_touching_eval_text_reruns_only_evaluation(demo: Demo, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, demo)
    first = build_release(recipe, tmp_path / "a", demo_root=DEMO_ROOT)
    assert {"convert", "imatrix", "gguf-Q4_K_M", "eval", "release"} <= set(first.ladder.log.built)
    with open(tmp_path / "eval.txt", "a") as f:
        f.write("\nWhat's past is prologue.\n")
    second = build_release(recipe, tmp_path / "a", demo_root=DEMO_ROOT)
    assert second.ladder.log.built == ["eval", "release"]
    assert verify(second.root).ok


def test_sigkill_midway_then_rerun_gives_a_complete_release(demo: Demo, tmp_path: Path) -> None:
    """SIGKILL a live ``quantize build`` while it computes the importance matrix (the kill checked to
    land there), then rerun it: a complete release that ``quantize verify`` accepts."""
    recipe = _recipe(tmp_path, demo)
    out = tmp_path / "k"
    build, release = out / "build" / "Tiny", out / "release" / "Tiny"

    def nothing_half_written() -> None:
        assert not release.exists()
        # Nothing half-written stands under a final name: every GGUF there is whole.
        for gguf in build.glob("[!.]*.gguf"):
            r = open_gguf(gguf)
            assert max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors) <= gguf.stat().st_size, gguf

    killed_then_rerun(["-v", "build", recipe, "--artifacts", out, "--demo-root", DEMO_ROOT], release, out, 5.0,
                      lambda p: cli("verify", p).returncode == 0, step=BuildStep("imatrix", build, build / "Tiny.imatrix.gguf"),
                      after_kill=nothing_half_written)
    assert verify(release).ok


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing", "extra"])
def test_verify_catches_tampering(release, damage: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "dl"
    shutil.copytree(release.root, copy)
    target = copy / "Demo-Mistral-ChatML.Q4_K_M.gguf"
    if damage == "flipped byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncated":
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size - 100)
    elif damage == "missing":
        target.unlink()
    else:
        (copy / "notes.txt").write_text("not part of the release")
    rep = verify(copy)
    assert not rep.ok
    expected = {"flipped byte": "wrong sha256: Demo-Mistral-ChatML.Q4_K_M.gguf", "truncated": "wrong size: Demo-Mistral-ChatML.Q4_K_M.gguf",
                "missing": "missing: Demo-Mistral-ChatML.Q4_K_M.gguf", "extra": "extra: notes.txt"}[damage]
    assert rep.lines() == [expected]
    res = subprocess.run([sys.executable, "-m", "quantize", "verify", str(copy)], capture_output=True, text=True)
    assert res.returncode == 4 and expected in res.stderr


# --- bad recipes --------------------------------------------------------------------------


def test_unknown_recipe_key(demo: Demo, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, demo)
    recipe.write_text(recipe.read_text().replace("[ladder]\n", "[ladder]\nggfu = [\"Q4_K_M\"]\n"))
    with pytest.raises(QuantizeError, match=r"\[ladder\] unknown key 'ggfu'; valid: awq, awq_samples") as e:
        build_release(recipe, tmp_path / "x", demo_root=DEMO_ROOT)
    assert str(recipe) in str(e.value)


def test_unknown_sampler_setting(demo: Demo, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, demo)
    recipe.write_text(recipe.read_text() + "[card.sampler]\ntemprature = 0.7\n")
    with pytest.raises(QuantizeError, match=r"\[card.sampler\] unknown setting 'temprature'; known: temperature,"):
        build_release(recipe, tmp_path / "x", demo_root=DEMO_ROOT)


# (text replaced in the demo recipe, the words of the one-line refusal)
WRONG_VALUES = {
    "name not a string": ('name = "Demo-Mistral-ChatML"', "name = 5", "[top level] name must be a string, got 5"),
    "gguf not a list": ('gguf = ["F16", "Q6_K", "Q4_K_M", { budget = "Q4_K_M" }]', 'gguf = "Q4_K_M"',
                        "[ladder] gguf must be a list of str"),
    "awq_samples zero": ("awq_samples = 16", "awq_samples = 0", "[ladder] awq_samples must be an integer >= 1, got 0"),
    "awq flag a string": ("awq = true", 'awq = "yes"', "[ladder] awq must be true or false"),
    "context a string": ("context = 2048", 'context = "4k"', "[card] context must be an integer >= 1, got '4k'"),
    "context negative": ("context = 2048", "context = -1", "[card] context must be an integer >= 1, got -1"),
    "stop of numbers": ('stop = ["<|im_end|>"]', "stop = [1]", "[card] stop[0] must be a string, got 1"),
    "sampler a string": ("temperature = 0.7", 'temperature = "hot"', "[card.sampler] temperature must be a number"),
    "sampler nan": ("temperature = 0.7", "temperature = nan", "[card.sampler] temperature must be a number"),
    "threshold a string": ("[card.sampler]", '[thresholds.Q4_K_M]\nppl_ratio = "tight"\n[card.sampler]',
                           "[thresholds.Q4_K_M] ppl_ratio must be a number > 0, got 'tight'"),
    "threshold zero": ("[card.sampler]", "[thresholds.Q6_K]\nmean_kld = 0\n[card.sampler]",
                       "[thresholds.Q6_K] mean_kld must be a number > 0, got 0"),
    "thresholds not tables": ("[card.sampler]", "[thresholds]\nQ4_K_M = 1.05\n[card.sampler]", "[thresholds] must hold one table"),
    "thresholds a number": ('quantized_by = "quantize"', 'quantized_by = "quantize"\nthresholds = 5', "[thresholds] must hold"),
}


@pytest.mark.parametrize("case", list(WRONG_VALUES))
def test_recipe_schema_refuses_wrong_values(case: str, tmp_path: Path) -> None:
    from quantize.recipe import load_recipe

    old, new, words = WRONG_VALUES[case]
    text = (Path(__file__).parent.parent / "recipes" / "demo.toml").read_text()
    assert old in text
    recipe = tmp_path / "r.toml"
    recipe.write_text(text.replace(old, new, 1))
    with pytest.raises(QuantizeError) as e:
        load_recipe(recipe)
    assert str(e.value).startswith(f"{recipe}: ") and words in str(e.value), str(e.value)


def test_recipe_naming_a_missing_model(demo: Demo, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, demo, base="nobody/no-such-model-7B")
    with pytest.raises(QuantizeError, match="base 'nobody/no-such-model-7B': not in the Hugging Face cache and not downloadable") as e:
        build_release(recipe, tmp_path / "x", demo_root=DEMO_ROOT)
    assert str(recipe) in str(e.value)


def test_lora_for_a_different_base(demo: Demo, tmp_path: Path) -> None:
    """An adapter trained on a model of another width must be refused before any export."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=32002, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    pm = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    adapter = tmp_path / "other-adapter"
    pm.save_pretrained(str(adapter))
    recipe = _recipe(tmp_path, demo, lora=str(adapter))
    with pytest.raises(QuantizeError, match="does not fit the base model") as e:
        build_release(recipe, tmp_path / "x", demo_root=DEMO_ROOT)
    assert str(adapter) in str(e.value)
    assert not (tmp_path / "x" / "release").exists()


def test_pickled_adapter_needs_opt_in(demo: Demo, tmp_path: Path) -> None:
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    recipe = _recipe(tmp_path, demo, lora=str(adapter))
    with pytest.raises(QuantizeError, match="is a pickle"):
        build_release(recipe, tmp_path / "x", demo_root=DEMO_ROOT)


def test_progress_is_quiet_line_logs_without_a_terminal(demo: Demo, tmp_path: Path) -> None:
    """The CLI with stderr redirected (as in CI): a long step reports four log lines, no bar redraws."""
    out = tmp_path / "im.gguf"
    run = subprocess.run([sys.executable, "-m", "quantize", "-v", "imatrix", str(demo.spm), "--text", str(demo.text["calib"]),
                          "-o", str(out), "--ctx", "256", "--chunks", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    blocks = [ln for ln in run.stderr.splitlines() if "quantize.progress: imatrix:" in ln]
    assert [ln.rsplit(" ", 1)[1] for ln in blocks] == ["1/4", "2/4", "3/4", "4/4"]  # the demo's 4 blocks
    assert "\r" not in run.stderr and "it/s" not in run.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(recipe: Path) -> None:
    from quantize.recipe import PROMPT_FORMATS, load_recipe

    r = load_recipe(recipe)
    assert r.card.prompt_format in PROMPT_FORMATS and r.ladder.gguf and r.name


def test_a_recipe_naming_no_text_calibrates_on_the_general_text(demo: Demo, tmp_path: Path) -> None:
    """No calibration or evaluation key: the build takes the general text, its chat in the model's own template;
    the release's imatrix.txt lists every source with its license, and the card says what both texts were."""
    from quantize.models.general_text import SOURCES

    recipe = tmp_path / "g.toml"
    recipe.write_text('name = "G"\nbase = "demo:mistral-spm"\n[ladder]\ngguf = ["F16", "Q4_K_M"]\nawq = false\nsmooth = false\n'
                      '[card]\nprompt_format = "chatml"\n')
    rel = build_release(recipe, tmp_path / "a", demo_root=DEMO_ROOT)
    assert not rel.failures
    described = (rel.root / "imatrix.txt").read_text()
    for src in SOURCES:
        assert f"{src.name}," in described and f"license {src.license};" in described
    card = (rel.root / "README.md").read_text()
    assert "Calibration text (importance matrix, smoothing, AWQ): the general calibration text" in card
    assert "Evaluation text (the quality gate): the general evaluation text" in card
    # conversations in the demo's ChatML template
    calib = next(p for p in (DEMO_ROOT / "general").glob("*/calib.txt") if "<|im_start|>assistant\n" in p.read_text())
    manifest = json.loads((rel.root / "manifest.json").read_text())
    assert manifest["evaluation_text_sha256"] == hashlib.sha256(calib.with_name("eval.txt").read_bytes()).hexdigest()

