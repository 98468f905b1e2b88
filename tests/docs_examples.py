"""The docs' examples, found and run as a reader runs them (tests/test_docs_examples.py).

Every fenced `bash` and `python` block of README.md and docs/*.md is an example. An HTML
comment right before a block says otherwise or more:

- `<!-- skip: REASON -->`: not run (a GPU, a cluster, S3 credentials, the suite itself);
  the reason is required and shows as the test's skip reason.
- `<!-- output of: COMMAND -->`: the block shows what COMMAND (an example earlier on the same
  page) prints; each shown line must appear, in order, in what it printed, with numbers,
  durations and the output's absolute path free to differ.

The blocks run in one sandbox checkout (the repo's files linked into a temporary folder, with
`.venv` the virtualenv running the tests), so `out/` and `.cache/` are the sandbox's own and
every command runs exactly as printed, from the repo root, after the README's set-up. A page's
blocks run in order and share one Python namespace, as in one reader's session. A command
that starts a server (`k3batch serve`, `serve run`) runs in the background until the page
ends, and the page's later examples talk to it (one that no later example needs, already
up earlier in the session, is not started again). Only the port moves: a server's 8000 becomes a
free port, in the command and in the clients alike (another test may hold 8000).

Parsing is markdown-it-py's (CommonMark), the Markdown parser `rich` uses; what is ours is
the markers, the sandbox and the output matching, which no doc-test plugin does as needed
here (pytest-codeblocks and mktestdocs compare output exactly or not at all, and take no
reason on a skip; Sybil's skip directive takes none without a condition).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
MARKER = re.compile(r"<!--\s*(skip|output of):\s*(.*?)\s*-->", re.S)
# Commands that serve until stopped: started in the background, ready on /healthz.
SERVER = re.compile(r"^\.venv/bin/k3batch serve ")
DEFAULT_PORT = 8000


@dataclass
class Block:
    page: str  # relative to the repo, e.g. docs/serving.md
    line: int  # the fence's first line, 1-based
    language: str  # bash, python, or the fence's own info (not run)
    code: str
    skip: str | None = None  # the skip marker's reason
    output_of: str | None = None  # the output marker's command

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """docs/*.md, then README.md: the README's commands are the docs' again, so in a whole
    run they reuse the docs' runs (a job or a server shown twice runs once)."""
    return [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]


def blocks(path: Path) -> list[Block]:
    """Every fenced block of the page, with the marker right before it (if any)."""
    from markdown_it import MarkdownIt

    found, pending = [], None
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        if token.type == "html_block":
            match = MARKER.search(token.content)
            if match:
                pending = match.groups()
        elif token.type == "fence":
            info = token.info.strip().split(" ")[0]
            block = Block(
                str(path.relative_to(REPO)),
                token.map[0] + 1,
                RUN_LANGUAGES.get(info, info),
                token.content,
            )
            if pending:
                kind, text = pending
                if kind == "skip":
                    block.skip = " ".join(text.split())
                else:
                    block.output_of = " ".join(text.split())
            found.append(block)
            pending = None
        elif token.type == "inline" and token.content.strip():
            pending = None  # a marker belongs to the block right after it
    return found


def commands(bash: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comment-only and blank lines
    dropped (a trailing comment stays: bash ignores it)."""
    out, current = [], ""
    for line in bash.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.count("'") % 2 or current.count('"') % 2:  # a quoted string goes on
            current += "\n"
            continue
        out.append(" ".join(current.split()) if "\n" not in current else current)
        current = ""
    if current.strip():
        out.append(current)
    return out


def bare(command: str) -> str:
    """A command without its trailing comment and with single spaces: what identifies it
    (the same job shown on two pages with different comments is one run)."""
    try:
        return shlex.join(shlex.split(command, comments=True))
    except ValueError:  # unbalanced quotes: keep it as it is
        return " ".join(command.split())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Server:
    command: str
    proc: subprocess.Popen
    log: Path


@dataclass
class Sandbox:
    """A checkout of the repo for the docs' commands: every top-level entry linked, but
    `out/` and `.cache/` (what the commands write) its own, and `.venv` the tests' own."""

    root: Path
    env: dict
    port: int = DEFAULT_PORT
    results: dict[str, Result] = field(default_factory=dict)  # k3batch runs, shared
    servers: list[Server] = field(default_factory=list)
    served: set[str] = field(default_factory=set)  # server commands that came up healthy
    seconds: dict[str, tuple] = field(default_factory=dict)  # page: (wall s, cpu s)

    @classmethod
    def create(cls, root: Path, env: dict) -> Sandbox:
        skip = {".git", ".venv", "out", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache"}
        for entry in REPO.iterdir():
            if entry.name not in skip:
                (root / entry.name).symlink_to(entry)
        (root / ".venv").symlink_to(venv())
        return cls(root, env)

    # ------------------------------------------------------------------ substitutions
    def moved(self, text: str) -> str:
        """`text` with the documented port 8000 moved to this sandbox's."""
        return text.replace(f":{DEFAULT_PORT}", f":{self.port}")

    # ------------------------------------------------------------------ bash
    def run(self, command: str, timeout: float = 900) -> Result:
        """Run one command as printed (in bash, from the sandbox root). A `k3batch run` is
        run once per session: the same job shown on two pages shares its run."""
        key = bare(command)
        if key in self.results:
            return self.results[key]
        started = time.monotonic()
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        result = Result(
            command, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started
        )
        if command.startswith(".venv/bin/k3batch run "):
            self.results[key] = result
        return result

    def serve(self, command: str, timeout: float = 600) -> Server:
        """Start a server command in the background; return once /healthz answers 200."""
        self.stop_servers()
        if self.port == DEFAULT_PORT:
            self.port = free_port()
        args = shlex.split(command, comments=True) + ["--port", str(self.port)]
        log = self.root / f"server-{len(self.servers)}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(
                args,
                cwd=self.root,
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(command, proc, log)
        self.servers.append(server)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{command} exited {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.port}/healthz"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        self.served.add(bare(command))
                        return server
            if time.monotonic() > deadline:
                raise AssertionError(f"{command} not ready in {timeout} s:\n{log.read_text()}")
            time.sleep(2)

    def stop_servers(self) -> list[tuple[Server, int]]:
        """Stop every running server with SIGINT (Ctrl-C), as a reader would; returns each
        with its exit code."""
        stopped = []
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGINT)
                try:
                    server.proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.proc.pid, signal.SIGKILL)
                    server.proc.wait(10)
            stopped.append((server, server.proc.returncode))
        self.servers = []
        return stopped

    # ------------------------------------------------------------------ python
    def python(self, code: str, namespace: dict, name: str) -> str:
        """Run a python block in the page's namespace from the sandbox root; its stdout."""
        out = io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(self.moved(code), name, "exec"), namespace)  # noqa: S102
        finally:
            os.chdir(cwd)
        return out.getvalue()


def venv() -> Path:
    """The virtualenv running the tests (the README's `.venv` on CI)."""
    prefix = Path(sys.prefix)
    if (prefix / "bin" / "k3batch").exists():
        return prefix
    return REPO / ".venv"


# ------------------------------------------------------------------ output matching
_NUMBER = re.compile(r"(?<![A-Za-z_])\d+(?:\.\d+)*")


def line_pattern(shown: str) -> re.Pattern:
    """A shown output line as a pattern: numbers (counts, seconds, rates, addresses) free,
    an absolute path to an output folder (`/.../out/demo/...`) free up to its `out/`, the rest
    as printed; runs of spaces as any run of spaces."""
    parts = []
    for token in shown.split():
        if token.startswith("/") and "/out/" in token:
            parts.append(r"\S*/out/" + re.escape(token.split("/out/", 1)[1]))
            continue
        pieces, pos = [], 0
        for match in _NUMBER.finditer(token):
            pieces += [re.escape(token[pos : match.start()]), r"[\d.]+"]
            pos = match.end()
        parts.append("".join(pieces) + re.escape(token[pos:]))
    return re.compile(r"\s+".join(parts))


def assert_shows(shown: str, printed: str) -> None:
    """Each non-blank shown line matches a printed line, in order."""
    lines = [" ".join(line.split()) for line in printed.splitlines()]
    at = 0
    for shown_line in shown.splitlines():
        if not shown_line.strip():
            continue
        pattern = line_pattern(shown_line)
        for i in range(at, len(lines)):
            if pattern.fullmatch(lines[i]):
                at = i + 1
                break
        else:
            raise AssertionError(
                f"shown line not printed (in this order): {shown_line!r}\nprinted:\n{printed}"
            )
