"""The release workflow (.github/workflows/release.yml), linted with actionlint and executed the way
a GitHub runner executes it for a ``workflow_dispatch`` with default inputs, without Docker:

* jobs in ``needs`` order, matrices expanded, each job in a fresh clone of a commit of the current
  working tree (a temporary commit object made with a private index: no branch or ref changes);
* ``${{ }}`` expressions evaluated (inputs, matrix, env, github, vars and secrets empty, ``||``,
  ``&&``, ``!``, comparisons with GitHub's loose equality, startsWith/endsWith/contains/format and
  the status functions), a step's ``if:`` wrapped in ``success() &&`` as GitHub does;
* ``actions/setup-python`` gives the job a bare interpreter of the requested version: a new venv
  holding pip only, first on a ``PATH`` from which every other ``python`` and ``nox`` is removed
  (with ``cache: pip``, a file to key the cache must exist, or the step fails as the action does);
* every ``run:`` step executed as written with ``bash --noprofile --norc -eo pipefail``: the
  workflow's own ``pip install nox``, then nox creating its venvs in the job's clone with the
  noxfile's install commands.  Jobs share pip's download and wheel caches (as ``cache: pip`` does),
  nothing else of the test's environment (its venv, ``PYTHONPATH``, ``NOX*``, ``QUANTIZE_*``, the
  user cache); pip does not byte-compile what it installs (``PIP_COMPILE=0``: the same files);
* the runs of a matrix at the same time, as GitHub runs them;
* ``actions/upload-artifact`` / ``download-artifact`` implemented: only the uploaded paths (globs,
  the least-common-ancestor root, hidden files only with ``include-hidden-files``) reach the jobs
  that download them; checkout is the clone; any other action fails the test unless its ``if:``
  skips it (the GitHub release and the Hub upload).

The demo models are the test machine's cache (``demo`` fixture), seeded into the first job's clone;
every later job gets them only from the workflow's artifacts.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from bare import bare_venv, runner_env, snapshot_commit
from conftest import ARTIFACTS, ROOT, MakeTemp

from quantize.models.demo import Demo

WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"


def test_actionlint_finds_nothing() -> None:
    """actionlint (the dev extra's wheel bundles the binary) checks syntax, expressions, runner labels
    and action versions, including actions whose runtime GitHub removes (node20)."""
    exe = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert exe, "actionlint is not installed: pip install -e '.[dev]'"
    out = subprocess.run([exe, "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


# --- expressions ------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<str>'(?:[^']|'')*')|(?P<op>\|\||&&|==|!=|<=|>=|[<>!().\[\],])"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_-]*))")
STATUS = {"success", "always", "failure", "cancelled"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot parse expression at {text[pos:]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _num(v: Any) -> float:
    if v is None:
        return 0.0
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v.strip() or 0) if isinstance(v, str) else float("nan")
    except ValueError:
        return float("nan")


def _eq(a: Any, b: Any) -> bool:
    """GitHub's loose equality: same types compare (strings ignoring case), others as numbers."""
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if type(a) is type(b):
        return bool(a == b)
    return _num(a) == _num(b)


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "startswith": lambda s, p: _text(s).lower().startswith(_text(p).lower()),
    "endswith": lambda s, p: _text(s).lower().endswith(_text(p).lower()),
    "contains": lambda s, p: any(_eq(x, p) for x in s) if isinstance(s, list) else _text(p).lower() in _text(s).lower(),
    "format": lambda f, *a: re.sub(r"\{(\d+)\}", lambda m: _text(a[int(m.group(1))]), _text(f)),
    "fromjson": lambda s: json.loads(_text(s)),
    "success": lambda: True, "always": lambda: True, "failure": lambda: False, "cancelled": lambda: False,
}


class Expression:
    """A recursive-descent evaluator for the GitHub expression syntax this workflow uses."""

    def __init__(self, text: str, ctx: dict[str, Any]) -> None:
        self.toks, self.i, self.ctx = _tokens(text), 0, ctx

    def value(self) -> Any:
        v = self._or()
        if self.i != len(self.toks):
            raise ValueError(f"unexpected {self.toks[self.i][1]!r}")
        return v

    def _peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def _take(self, want: str | None = None) -> tuple[str, str]:
        tok = self.toks[self.i]
        if want is not None and tok[1] != want:
            raise ValueError(f"expected {want!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def _or(self) -> Any:
        v = self._and()
        while self._peek() == "||":
            self._take()
            rhs = self._and()
            v = v if v else rhs
        return v

    def _and(self) -> Any:
        v = self._cmp()
        while self._peek() == "&&":
            self._take()
            rhs = self._cmp()
            v = rhs if v else v
        return v

    def _cmp(self) -> Any:
        v = self._unary()
        op = self._peek()
        if op in ("==", "!=", "<", ">", "<=", ">="):
            self._take()
            rhs = self._unary()
            if op in ("==", "!="):
                return _eq(v, rhs) == (op == "==")
            a, b = _num(v), _num(rhs)
            return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]
        return v

    def _unary(self) -> Any:
        if self._peek() == "!":
            self._take()
            return not self._unary()
        return self._postfix()

    def _postfix(self) -> Any:
        v = self._primary()
        while self._peek() in (".", "["):
            if self._take()[1] == ".":
                key: Any = self._take()[1]
            else:
                key = self._or()
                self._take("]")
            v = v.get(key) if isinstance(v, dict) else None
        return v

    def _primary(self) -> Any:
        kind, tok = self._take()
        if tok == "(":
            v = self._or()
            self._take(")")
            return v
        if kind == "num":
            return float(tok)
        if kind == "str":
            return tok[1:-1].replace("''", "'")
        if kind == "name":
            if tok in ("true", "false"):
                return tok == "true"
            if tok == "null":
                return None
            if self._peek() == "(":
                self._take()
                args = []
                while self._peek() != ")":
                    args.append(self._or())
                    if self._peek() == ",":
                        self._take()
                self._take(")")
                return FUNCTIONS[tok.lower()](*args)
            return self.ctx.get(tok)
        raise ValueError(f"unexpected {tok!r}")


def evaluate(text: str, ctx: dict[str, Any]) -> Any:
    return Expression(text, ctx).value()


def interpolate(value: Any, ctx: dict[str, Any]) -> Any:
    """``${{ }}`` replaced in a string (recursively in mappings and lists); a value that is one
    expression and nothing else takes the expression's own type (a list for a matrix axis)."""
    if isinstance(value, dict):
        return {k: interpolate(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, ctx) for v in value]
    if not isinstance(value, str):
        return value
    whole = re.fullmatch(r"\s*\$\{\{((?:(?!\}\}).)*)\}\}\s*", value, flags=re.S)
    if whole:
        return evaluate(whole.group(1), ctx)
    return re.sub(r"\$\{\{(.*?)\}\}", lambda m: _text(evaluate(m.group(1), ctx)), value)


def condition(text: Any, ctx: dict[str, Any]) -> bool:
    """A step or job ``if:``: an expression with or without ``${{ }}``, ``success() &&`` implied."""
    if text is None:
        return True
    expr = str(text).strip()
    if expr.startswith("${{") and expr.endswith("}}"):
        expr = expr[3:-2]
    if not any(re.search(rf"\b{f}\s*\(", expr) for f in STATUS):
        expr = f"success() && ({expr})"
    return bool(evaluate(expr, ctx))


@pytest.mark.parametrize(("expr", "want"), [
    ("inputs.recipe || 'recipes/demo.toml'", "recipes/x.toml"),
    ("inputs.none || vars.GPU_RUNNER || 'ubuntu-latest'", "ubuntu-latest"),
    ("env.HF_TOKEN != ''", False),       # unset: null == '' under GitHub's coercion
    ("env.EMPTY != ''", False),
    ("env.SET != ''", True),
    ("startsWith(github.ref, 'refs/tags/')", False),
    ("startsWith(github.ref, 'REFS/heads/')", True),
    ("!(1 == 2) && format('{0}-{1}', 'a', matrix.type)", "a-Q6_K"),
    ("fromJSON('[\"Q4_K_M\", \"Q6_K\"]')", ["Q4_K_M", "Q6_K"]),
    ("needs.convert.outputs.types", '["Q6_K"]'),
    ("hashFiles('x')", None),
])
def test_expression_evaluator_follows_github_semantics(expr: str, want: Any) -> None:
    ctx = {"inputs": {"recipe": "recipes/x.toml"}, "vars": {}, "env": {"EMPTY": "", "SET": "tok"},
           "github": {"ref": "refs/heads/main"}, "matrix": {"type": "Q6_K"}, "needs": {"convert": {"outputs": {"types": '["Q6_K"]'}}}}
    if want is None:
        with pytest.raises(KeyError):
            evaluate(expr, ctx)  # unknown functions are refused, not guessed
    else:
        assert evaluate(expr, ctx) == want


# --- artifacts --------------------------------------------------------------------------------

def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _search_root(pattern: str) -> Path:
    """The literal path before the first component with a wildcard."""
    parts = []
    for part in Path(pattern).parts:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def upload_artifact(work: Path, store: Path, args: dict[str, Any]) -> list[Path]:
    """actions/upload-artifact: the files the path patterns match, relative to their least common
    ancestor (a single directory: its contents), hidden ones only with include-hidden-files."""
    lines = [s.strip() for s in str(args["path"]).splitlines() if s.strip()]
    include = [s for s in lines if not s.startswith("!")]
    exclude = [s[1:] for s in lines if s.startswith("!")]
    files: set[Path] = set()
    roots = []
    for pat in include:
        roots.append(_search_root(pat))
        for hit in glob.glob(pat, root_dir=work, recursive=True, include_hidden=True):
            p = work / hit
            files |= {f.relative_to(work) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()}
    files = {f for f in files if not any(fnmatch.fnmatch(str(f), e) for e in exclude)}
    if str(args.get("include-hidden-files", "false")).lower() != "true":
        files = {f for f in files if not _hidden(f)}
    if not files:
        if args.get("if-no-files-found", "warn") == "error":
            raise AssertionError(f"upload-artifact {args['name']}: no files match {lines}")
        return []
    if len(roots) == 1:
        root = roots[0] if (work / roots[0]).is_dir() else roots[0].parent
    else:
        root = Path(os.path.commonpath([str(r) for r in roots]))
    dest = store / str(args["name"])
    assert not dest.exists(), f"artifact {args['name']} uploaded twice in one run"
    for f in files:
        (dest / f.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / f, dest / f.relative_to(root))
    return sorted(files)


def download_artifact(work: Path, store: Path, args: dict[str, Any]) -> None:
    """actions/download-artifact: by name into path, or by pattern (each into path/<name>/ unless
    merge-multiple)."""
    dest = work / str(args.get("path", "."))
    if "name" in args:
        assert (store / str(args["name"])).is_dir(), f"no artifact named {args['name']}"
        targets = [(store / str(args["name"]), dest)]
    else:
        merge = str(args.get("merge-multiple", "false")).lower() == "true"
        names = sorted(p.name for p in store.iterdir() if fnmatch.fnmatch(p.name, str(args.get("pattern", "*"))))
        assert names, f"no artifact matches {args.get('pattern')}"
        targets = [(store / n, dest if merge else dest / n) for n in names]
    for src, to in targets:
        shutil.copytree(src, to, dirs_exist_ok=True, copy_function=shutil.copyfile)


# --- jobs -------------------------------------------------------------------------------------

@dataclass
class JobRun:
    name: str
    work: Path
    runs_on: str
    steps: list[str] = field(default_factory=list)  # "ran: ...", "skipped: ...", "action: ..."
    produced: set[str] = field(default_factory=set)  # files under artifacts/ its run: steps made or changed


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def _jobs_in_order(jobs: dict[str, Any]) -> list[str]:
    order: list[str] = []
    while len(order) < len(jobs):
        ready = [j for j in jobs if j not in order and set(_needs(jobs[j])) <= set(order)]
        assert ready, f"cycle in needs: {set(jobs) - set(order)}"
        order += ready
    return order


def _needs(job: dict[str, Any]) -> list[str]:
    needs = job.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


def _matrix(job: dict[str, Any], ctx: dict[str, Any]) -> list[dict[str, Any]]:
    matrix = interpolate(job.get("strategy", {}).get("matrix", {}), ctx)
    assert not set(matrix) & {"include", "exclude"}, "matrix include/exclude are not implemented by this runner"
    keys = list(matrix)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(matrix[k] for k in keys))] or [{}]


def _step_outputs(path: Path) -> dict[str, str]:
    """What a step wrote to $GITHUB_OUTPUT: ``name=value`` lines and ``name<<DELIMITER`` blocks."""
    out: dict[str, str] = {}
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            body = []
            for more in lines:
                if more == delim:
                    break
                body.append(more)
            out[name] = "\n".join(body)
        elif "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
    return out


class StepFailed(AssertionError):
    """A ``run:`` step exited non-zero: the job, the step as written, its exit status and its output."""

    def __init__(self, job: str, step: str, rc: int, log: str) -> None:
        self.job, self.step, self.rc, self.log = job, step, rc, log
        tail = "\n".join(log.splitlines()[-30:])
        super().__init__(f"{job}: `{step}` exited {rc}:\n{tail}")


def run_workflow(path: Path, repo: Path, tmp: Path, seed: Callable[[Path], None]) -> list[JobRun]:
    """Every job of the workflow at ``path`` on a snapshot of ``repo``, in ``needs`` order; the runs of a
    matrix at the same time, as GitHub runs them.  ``seed`` prepares the clone of a job that needs none."""
    wf = yaml.safe_load(path.read_text())
    trigger = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    inputs = {k: v.get("default", "") for k, v in (trigger["workflow_dispatch"].get("inputs") or {}).items()}
    commit = snapshot_commit(repo)
    store = tmp / "artifact-store"
    store.mkdir(parents=True)
    runs: list[JobRun] = []
    outputs: dict[str, dict[str, str]] = {}  # job id -> its `outputs:`, evaluated when its (last) run ends
    order = _jobs_in_order(wf["jobs"])
    for job_id in order:
        job = wf["jobs"][job_id]
        base = {"inputs": inputs, "vars": {}, "secrets": {}, "github": {
            "ref": "refs/heads/main", "event_name": "workflow_dispatch", "repository": "local/quantize"},
            "needs": {n: {"result": "success", "outputs": outputs[n]} for n in _needs(job)}}
        matrices = _matrix(job, base)
        works = [tmp / f"job-{len(runs) + k}-{job_id}" for k in range(len(matrices))]
        with ThreadPoolExecutor(len(matrices)) as pool:
            done = list(pool.map(partial(_run_job, wf=wf, job_id=job_id, base=base, repo=repo, commit=commit, store=store, seed=seed),
                                 matrices, works))
        for run, ctx in done:
            outputs[job_id] = {k: _text(v) for k, v in interpolate(job.get("outputs", {}), ctx).items()}
            runs.append(run)
        if job_id != order[-1]:  # the tests read the last job's venv; no later job reads an earlier one's
            _drop_venvs(tmp)  # the finished jobs' interpreters and nox venvs, gigabytes each
    return runs


def _run_job(matrix: dict[str, Any], work: Path, *, wf: dict[str, Any], job_id: str, base: dict[str, Any], repo: Path, commit: str,
             store: Path, seed: Callable[[Path], None]) -> tuple[JobRun, dict[str, Any]]:
    """One run of a job (one matrix combination) in a fresh clone at ``work``: the run and its final context."""
    job, tmp = wf["jobs"][job_id], work.parent
    name = job_id + (f" ({', '.join(map(str, matrix.values()))})" if matrix else "")
    subprocess.run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(repo), str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "checkout", "--quiet", "--detach", commit], check=True)
    if not _needs(job):
        seed(work)
    ctx = {**base, "matrix": matrix, "runner": {"os": "Linux", "temp": str(tmp)}, "steps": {}}
    ctx["env"] = {}
    for scope in (wf.get("env", {}), job.get("env", {})):
        ctx["env"] = {**ctx["env"], **{k: _text(interpolate(v, ctx)) for k, v in scope.items()}}
    run = JobRun(name, work, _text(interpolate(job.get("runs-on", ""), ctx)))
    python_bin: Path | None = None  # until setup-python runs, the runner has no `python`
    assert condition(job.get("if"), ctx), f"job {name} skipped on workflow_dispatch"
    for i, step in enumerate(job["steps"]):
        step_ctx = {**ctx, "env": {**ctx["env"], **{k: _text(interpolate(v, ctx)) for k, v in step.get("env", {}).items()}}}
        label = step.get("name") or step.get("uses") or step.get("run", "").strip()
        if not condition(step.get("if"), step_ctx):
            run.steps.append(f"skipped: {label}")
            continue
        if "uses" in step:
            action = step["uses"].split("@")[0]
            args = interpolate(step.get("with", {}), step_ctx)
            if action == "actions/upload-artifact":
                upload_artifact(work, store, args)
            elif action == "actions/download-artifact":
                download_artifact(work, store, args)
            elif action == "actions/setup-python":
                if args.get("cache") == "pip":  # the action fails the job when nothing can key its cache
                    keys = str(args.get("cache-dependency-path") or "**/requirements.txt\n**/pyproject.toml").split()
                    assert any(glob.glob(k, root_dir=work, recursive=True) for k in keys), \
                        f"{name}: setup-python (cache: pip): no file matches {keys}"
                python_bin = bare_venv(tmp / f"{work.name}-python", str(args["python-version"]))
            else:
                assert action == "actions/checkout", f"{name}: cannot run {step['uses']}"
            run.steps.append(f"action: {step['uses']}")
            continue
        script = tmp / f"{work.name}-step{i}.sh"
        script.write_text(interpolate(step["run"], step_ctx))
        env = {**runner_env(python_bin, tmp / f"{work.name}-cache"), **step_ctx["env"], "CI": "true",
               "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(work), "GITHUB_REF": base["github"]["ref"],
               "GITHUB_EVENT_NAME": "workflow_dispatch"}
        out_file = tmp / f"{work.name}-step{i}.output"
        out_file.touch()
        env["GITHUB_OUTPUT"] = str(out_file)
        before = _files(work / "artifacts")
        log = tmp / f"{work.name}-step{i}.log"
        with log.open("w") as out:
            rc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            raise StepFailed(name, label, rc, log.read_text())
        after = _files(work / "artifacts")
        run.produced |= {f for f, st in after.items() if before.get(f) != st and Path(f).name != ".lock"}  # the build lock is no product
        run.steps.append(f"ran: {label}")
        if "id" in step:
            ctx["steps"][step["id"]] = {"outputs": _step_outputs(out_file), "outcome": "success"}
    return run, ctx


# --- the run ----------------------------------------------------------------------------------

def _drop_venvs(tmp: Path) -> None:
    """The jobs' interpreters and nox venvs (gigabytes each), once the tests have read the run."""
    for venv in [*tmp.glob("job-*-python"), *tmp.glob("job-*/.nox")]:
        shutil.rmtree(venv, ignore_errors=True)


@pytest.fixture(scope="module")
def workflow_run(demo: Demo, module_mktemp: MakeTemp) -> Iterator[list[JobRun]]:
    from quantize.engine.lora import train_demo_lora

    train_demo_lora(demo.spm, demo.text["train"], demo.root / "lora")  # the recipe's demo:lora, cached like the models
    cache = ARTIFACTS / "demo"

    def seed(work: Path) -> None:
        """The first job starts with the demo cache (a GitHub run would train the demo models there)."""
        shutil.copytree(cache.resolve(), work / "artifacts" / "demo")

    tmp = module_mktemp("workflow")
    try:
        yield run_workflow(WORKFLOW, ROOT, tmp, seed)
    finally:
        _drop_venvs(tmp)


def test_a_workflow_missing_an_install_step_fails_at_the_step_that_needed_it(tmp_path: Path) -> None:
    """The runner's interpreter is bare: with the convert job's ``pip install nox`` removed, the job
    stops at its first nox step, naming the module that was never installed."""
    text = WORKFLOW.read_text()
    install = "      - run: python -m pip install nox\n"
    assert install in text
    broken = tmp_path / "release.yml"
    broken.write_text(text.replace(install, "", 1))  # the first job's only
    with pytest.raises(StepFailed) as failed:
        run_workflow(broken, ROOT, tmp_path / "run", lambda work: None)
    assert (failed.value.job, failed.value.step, failed.value.rc) == ("convert", "python -m nox -s convert", 1)
    assert "No module named nox" in failed.value.log
    _drop_venvs(tmp_path / "run")


def test_workflow_runs_end_to_end_and_the_release_verifies(workflow_run: list[JobRun]) -> None:
    from quantize.recipe import load_recipe

    quants = [t for t in load_recipe(ROOT / "recipes" / "demo.toml").ladder.gguf if t != "F16"]  # one gguf job each
    assert [r.name for r in workflow_run] == ["convert", *(f"gguf ({t})" for t in quants), "awq", "gate-and-release"]
    gate = workflow_run[-1]
    assert "ran: python -m nox -s verify" in gate.steps
    # publishing and the GitHub release need a tag and secrets: their own conditions skip them
    assert "skipped: Upload to the Hugging Face Hub" in gate.steps
    assert "skipped: softprops/action-gh-release@v3" in gate.steps
    assert {r.runs_on for r in workflow_run} == {"ubuntu-latest"}  # no GPU runner named: AWQ on a CPU runner
    releases = [p for p in (gate.work / "artifacts" / "release").iterdir() if p.is_dir()]
    assert [p.name for p in releases] == ["Demo-Mistral-ChatML"]
    # the quantize the job's nox installed from the job's clone, not the test's
    out = subprocess.run([str(gate.work / ".nox" / "_build" / "bin" / "quantize"), "verify", str(releases[0])],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = json.loads((releases[0] / "manifest.json").read_text())
    assert [a["kind"] for a in manifest["artifacts"]] == ["F16", "Q6_K", "Q4_K_M", "Q4_K_M-mix", "imatrix", "SillyTavern", "AWQ"]


def test_no_job_rebuilds_another_jobs_work(workflow_run: list[JobRun]) -> None:
    """Every file under artifacts/ is made by one job only: later jobs reuse what they download
    (the demo models, the merged model, the F16, the importance matrix, each quantization)."""
    made: dict[str, str] = {}
    for run in workflow_run:
        for f in sorted(run.produced):
            assert f not in made, f"{f}: made by {made.get(f)} and again by {run.name}"
            made[f] = run.name
    by_job = {run.name: run.produced for run in workflow_run}
    assert any(f.endswith(".F16.gguf") for f in by_job["convert"]) and any(f.endswith(".imatrix.gguf") for f in by_job["convert"])
    assert [f for f in by_job["gguf (Q6_K)"] if f.endswith(".gguf")] == ["build/Demo-Mistral-ChatML/Demo-Mistral-ChatML.Q6_K.gguf"]
    assert any("-AWQ/" in f for f in by_job["awq"]) and not any(f.endswith(".gguf") for f in by_job["awq"])
