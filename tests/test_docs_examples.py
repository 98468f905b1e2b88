"""Docs that run: every shell and Python example of README.md and docs/*.md runs as printed
after the README's set-up (in a sandbox checkout), or is marked with the reason it cannot run
here; outputs the docs show are asserted; and every job the docs run is a healthy run that
prints only k3batch's lines (tests/docs_examples.py says how)."""

from __future__ import annotations

import os
import re
import time

import pytest

from . import docs_examples as dx
from .test_cli import NOISE

PAGES = dx.pages()
RUNNABLE = [
    p for p in PAGES if any(b.language in ("bash", "python") or b.output_of for b in dx.blocks(p))
]
# The demo configs: each must be run by a docs example (and so checked for quiet output).
DEMOS = sorted(
    {p.name for p in (dx.REPO / "configs").glob("*-demo.yaml") if not p.name.startswith("serve")}
    | {p.name for p in (dx.REPO / "configs").glob("kandinsky22-*.yaml") if "gpu" not in p.name}
)
K3BATCH_LINE = re.compile(r"(\(.* pid=\d+[^)]*\) )?k3batch")
# Jobs whose runs must be quiet: the demos, and the demo with more settings. Not yet
# demo-beautify.yaml: its CPU vLLM engine logs warnings of its own (Triton, tcmalloc, ...).
QUIET = re.compile(
    r"\.venv/bin/k3batch run configs/(" + "|".join(map(re.escape, [*DEMOS, "demo.yaml"])) + r")\s"
)


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def assert_quiet(result: dx.Result) -> None:
    """A healthy run: exit 0, and stderr holds only k3batch's lines (its own and the actors'
    as Ray forwards them): no warnings, tracebacks or progress bars."""
    assert result.returncode == 0, f"{result.command}:\n{result.stderr[-4000:]}"
    noisy = [ln for ln in (result.stdout + result.stderr).splitlines() if NOISE.search(ln)]
    assert not noisy, f"{result.command} printed:\n" + "\n".join(noisy)
    for line in result.stderr.splitlines():
        assert K3BATCH_LINE.match(line), f"{result.command} printed: {line}"


# ------------------------------------------------------------------ static checks (fast)
def test_every_example_runs_or_says_why_not():
    problems = []
    for page in PAGES:
        for block in dx.blocks(page):
            if block.skip is not None and not block.skip:
                problems.append(f"{block.id}: a skip marker without a reason")
            looks_like_shell = re.search(r"^(\.venv/bin/)?k3batch \w", block.code, re.M)
            shown = block.output_of is not None
            if block.language not in ("bash", "python") and looks_like_shell and not shown:
                problems.append(f"{block.id}: a command in a `{block.language}` block")
    assert not problems, "\n".join(problems)


# What the README's set-up puts where: `.venv/` with its scripts, not activated.
BARE = re.compile(r"^\s*(k3batch|python|pip|pytest|serve|ray|vllm) ", re.M)
# A command in the prose: a sub-command with an argument (not `k3batch run` the name, nor an
# option mentioned: `k3batch run --overwrite`).
COMMAND = re.compile(
    r"k3batch (run|serve|submit|report|make-tiny|convert|config|chat-template) [^-\s]"
)


def test_commands_are_written_as_the_readme_sets_them_up():
    """`.venv/bin/k3batch` everywhere: the README's set-up creates `.venv/` without
    activating it (docs/testing.md says why), so a bare `k3batch` is "command not found"."""
    problems = []
    for page in PAGES:
        for block in dx.blocks(page):
            if block.language != "bash":
                continue
            for command in dx.commands(block.code):
                for part in re.split(r"\|\||&&|\||;", command):
                    if BARE.match(part):
                        problems.append(f"{block.id}: {part.strip()}")
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for code in re.findall(r"`([^`\n]+)`", text):
            if re.match(COMMAND, code):
                problems.append(f"{page.relative_to(dx.REPO)}: `{code}`")
    assert not problems, "bare commands (use .venv/bin/...):\n" + "\n".join(problems)


def test_markers_are_read():
    page = dx.REPO / "docs" / "superres.md"
    skipped = [b for b in dx.blocks(page) if b.skip]
    assert skipped and all(b.skip.startswith("needs ") for b in skipped)
    assert dx.commands("a \\\n  b  # c\n# d\n\nprintf '{\"x\":\n 1}' > f\n") == [
        "a b # c",
        "printf '{\"x\":\n 1}' > f",
    ]
    pattern = dx.line_pattern("report        /work/k3batch/out/demo/report/index.html")
    assert pattern.fullmatch("report /tmp/x/y/out/demo/report/index.html")
    assert dx.line_pattern("wall time 39.2 s (0.92 images/s)").fullmatch(
        "wall time 104.7 s (0.34 images/s)"
    )


# ------------------------------------------------------------------ running them
@pytest.fixture(scope="session")
def sandbox(tmp_path_factory, short_tmp):
    root = tmp_path_factory.mktemp("docs-checkout")
    ray_tmp = short_tmp("d")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    for name in ("RAY_AUTH_MODE", "RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_ADDRESS"):
        env.pop(name, None)  # the suite's own settings: a reader has none of them
    # OMP_NUM_THREADS=1 (conftest) stays: it changes no output, only how the examples' torch
    # shares two cores with the other test process.
    box = dx.Sandbox.create(root, env)
    yield box
    box.stop_servers()
    # Each page's (wall s, cpu s of its commands).
    total = sum(wall for wall, _ in box.seconds.values())
    pages = ", ".join(f"{k} {wall:.0f} s" for k, (wall, _) in box.seconds.items())
    print(f"\ndocs examples: {total:.0f} s ({pages})")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a page runs several demo jobs (Kandinsky 2.2: five and a server)
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(dx.REPO)))
def test_page_examples_run_as_printed(page, sandbox):
    started = time.monotonic()
    cpu_before = children_cpu()
    namespace: dict = {"__name__": "__docs__"}
    printed: dict[str, str] = {}  # command -> what it printed, for output markers
    skipped = []
    page_blocks = dx.blocks(page)
    try:
        for i, block in enumerate(page_blocks):
            if block.skip:
                skipped.append(f"{block.id} ({block.skip})")
            elif block.output_of:
                shown_by = dx.bare(block.output_of)
                assert shown_by in printed, f"{block.id}: no earlier {block.output_of!r}"
                dx.assert_shows(block.code, printed[shown_by])
            elif block.language == "bash":
                lines = dx.commands(block.code)
                for j, command in enumerate(lines):
                    if dx.SERVER.match(command):
                        # A server no later example of the page talks to, already up and
                        # stopped cleanly earlier in the session: the same run, shared.
                        used = j + 1 < len(lines) or any(
                            b.language in ("bash", "python") and not b.skip
                            for b in page_blocks[i + 1 :]
                        )
                        if used or dx.bare(command) not in sandbox.served:
                            sandbox.serve(command)
                        continue
                    result = sandbox.run(sandbox.moved(command))
                    if QUIET.match(command + " "):
                        assert_quiet(result)
                    assert result.returncode == 0, (
                        f"{block.id}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
                    )
                    printed[dx.bare(command)] = result.stdout + result.stderr
            elif block.language == "python":
                printed[block.id] = sandbox.python(block.code, namespace, block.id)
    finally:
        stopped = sandbox.stop_servers()
        sandbox.seconds[page.name] = (time.monotonic() - started, children_cpu() - cpu_before)
    for server, code in stopped:
        assert code == 0, f"{server.command} exited {code} on Ctrl-C:\n{server.log.read_text()}"
    if skipped:
        print("not run: " + "; ".join(skipped))


def test_every_demo_config_is_run_by_the_docs():
    """Each demo job is a docs example, so the docs run checks it is quiet (above)."""
    ran = set()
    for page in PAGES:
        for block in dx.blocks(page):
            if block.language == "bash" and not block.skip:
                for command in dx.commands(block.code):
                    ran |= set(re.findall(r"\.venv/bin/k3batch run configs/(\S+\.yaml)", command))
    assert set(DEMOS) <= ran, f"demo configs no docs example runs: {sorted(set(DEMOS) - ran)}"
