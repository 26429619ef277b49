"""The docs site cannot rot: the CLI reference is the app's (every command and option, regenerated
and compared), `mkdocs build --strict` passes (no broken link or anchor, no page outside the
navigation), the getting-started page's quickstart commands run, and the README stays short."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CLI_MD = DOCS / "reference" / "cli.md"
MARKER = "<!-- quickstart-commands:"


def _load_script(name: str):
    """A module of scripts/ by file (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _app_commands() -> dict[str, list[str]]:
    """Every command of the typer app and every option string of it (`--x`, `--no-x`), walked from
    the click tree here, independently of the generator script."""
    from cli import app

    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        opts = []
        for p in cmd.params:
            if p.param_type_name == "option":
                opts += [*p.opts, *p.secondary_opts]
        out[name] = opts
    return out


def _sections(text: str) -> dict[str, str]:
    """`## name` sections of the reference page, by name."""
    parts = re.split(r"^## ", text, flags=re.M)
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


def test_the_cli_reference_is_the_one_the_app_gives_now():
    generated = _load_script("cli_reference").reference_markdown()
    assert CLI_MD.exists(), "docs/reference/cli.md is missing: run `python scripts/cli_reference.py`"
    assert CLI_MD.read_text() == generated, (
        "docs/reference/cli.md is stale (a command, option or help text changed): run "
        "`python scripts/cli_reference.py` (or `make docs`)")


def test_every_command_and_option_of_the_app_is_in_the_reference():
    sections = _sections(CLI_MD.read_text())
    missing = []
    for name, opts in _app_commands().items():
        if name not in sections:
            missing.append(f"command {name}")
            continue
        # an option string stands alone: `--seed` must not be found inside `--seeds` or `--bootstrap-seed`
        missing += [f"{name} {o}" for o in opts
                    if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", sections[name])]
    assert not missing, f"not in docs/reference/cli.md: {missing}"
    assert len(_app_commands()) >= 14  # the walk found the app's commands at all


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for v in item.values():
                out += _nav_pages(v) if isinstance(v, list) else [v]
    return out


def test_every_page_is_in_the_navigation_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == pages, f"orphans: {set(pages) - set(nav)}; missing: {set(nav) - set(pages)}"


def test_mkdocs_build_strict_passes(tmp_path):
    """No broken link or anchor, no orphan page (mkdocs.yml's validation turns them into warnings,
    --strict into errors)."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "reference" / "cli.html").exists()


def quickstart_block() -> list[str]:
    """The commands of the getting-started page's marked fenced block, one per entry."""
    text = (DOCS / "getting-started.md").read_text()
    assert text.count(MARKER) == 1, f"getting-started.md needs exactly one {MARKER} block"
    after = text.split(MARKER, 1)[1]
    m = re.search(r"```bash\n(.*?)```", after, flags=re.S)
    assert m and after[:m.start()].count("\n") <= 1, "the marker must sit right above a ```bash block"
    return [line.strip() for line in m.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def _quickstart_commands(monkeypatch, tmp_path: Path) -> list[str]:
    """What scripts/quickstart.py runs, recorded instead of run (paths relative to the repo root)."""
    qs = _load_script("quickstart")
    calls: list[str] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qs, "WORK", Path("runs") / "quickstart")
    monkeypatch.setattr(qs, "make_images", lambda root: None)
    monkeypatch.setattr(qs, "dnf", lambda *args: calls.append(shlex.join(["dnf-pipeline", *args])))
    qs.main()
    return calls


def test_the_getting_started_commands_are_the_quickstart_and_they_run(monkeypatch, tmp_path):
    block = quickstart_block()
    assert all(line.startswith("dnf-pipeline ") for line in block), \
        f"only dnf-pipeline commands belong in the tested block: {block}"
    assert block == _quickstart_commands(monkeypatch, tmp_path), \
        "docs/getting-started.md's quickstart block differs from what scripts/quickstart.py runs"

    from cli import app

    _load_script("quickstart").make_images(tmp_path / "runs" / "quickstart" / "data")
    runner = CliRunner()
    sigterm = signal.getsignal(signal.SIGTERM)  # train sets its own; the test process keeps pytest's
    try:
        for line in block:
            result = runner.invoke(app, shlex.split(line)[1:])
            assert result.exit_code == 0, f"$ {line}\n{result.output}\n{result.exception!r}"
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    report = tmp_path / "runs" / "quickstart" / "run" / "eval" / "quickstart" / "report.md"
    assert report.exists() and "AUC" in report.read_text()
    assert "\t" in result.output  # detect printed path, probability and verdict


def test_the_readme_is_short_shows_make_test_first_and_links_into_the_site():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150; the rest belongs in docs/)"
    assert any("make test" in line for line in lines[:30])
    links = re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines))
    assert links, "the README links into the docs site"
    assert not [link for link in links if not (ROOT / link).exists()], "README links to missing pages"

