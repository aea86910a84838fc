from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    # the last line is the README's test command, verbatim; lines before it only install system packages
    assert f"\n{ci_lines[-1]}\n" in (ROOT / "README.md").read_text()
    assert "pytest" in ci_lines[-1] and not any("pytest" in l for l in ci_lines[:-1])


def test_readme_tree_lists_every_module_script_and_dev_tool():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout"))]
    files = [p for folder in ("nanochat", "scripts", "dev") for p in sorted((ROOT / folder).glob("*.py"))]
    missing = [f"{p.parent.name}/{p.name}" for p in files if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"README's layout section is missing {missing}"
