"""The Python snippets of README.md's quick start run as written (a newcomer copies them verbatim)."""

import ast
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start_snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_quick_start_python_snippets_run():
    snippets = _quick_start_snippets()
    assert len(snippets) >= 2
    for snippet in snippets:
        namespace: dict = {}
        exec(compile(snippet, str(README), "exec"), namespace)


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in README.read_text()


def test_every_test_the_reliability_section_cites_exists():
    section = README.read_text().split("## Runs that survive crashes", 1)[1].split("\n## ", 1)[0]
    cited = set(re.findall(r"\b(test_\w+)(?:\[|`|::|\b)", section)) - {
        name for name in re.findall(r"\b(test_\w+)\.py", section)
    }
    defined = set()
    for path in (README.parent / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.MULTILINE))
    assert len(cited) >= 15
    assert cited <= defined, f"README cites tests that do not exist: {sorted(cited - defined)}"


def test_every_python_snippet_compiles_and_its_imports_resolve():
    """The snippets outside the quick start train for minutes, so they are not run here; but a renamed class
    or a syntax slip in any of them fails this test."""
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(snippets) >= 4
    for snippet in snippets:
        tree = compile(snippet, str(README), "exec", flags=ast.PyCF_ONLY_AST)
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(body=imports, type_ignores=[]), str(README), "exec"), {})


def test_every_file_the_readme_names_exists():
    text = README.read_text()
    named = {m.rstrip(".,") for m in re.findall(r"\b(?:configs|scripts|docs|tests)/[\w./-]+", text)}
    assert len(named) >= 20
    missing = sorted(p for p in named if not (README.parent / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"
