"""Rules for the code itself, kept by tests so that they cannot drift."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qemupatch"
SOURCES = sorted(PACKAGE.glob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_chdir_no_sys_exit_no_bare_except(path):
    """Commands get cwd=, never a changed process directory; library code
    raises errors instead of exiting; no bare except hides a failure."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "chdir":
            pytest.fail(f"{path.name}:{node.lineno}: os.chdir")
        if isinstance(node, ast.ExceptHandler) and node.type is None:
            pytest.fail(f"{path.name}:{node.lineno}: bare except")
        if (path.name not in ("cli.py", "__main__.py") and isinstance(node, ast.Attribute)
                and node.attr == "exit" and getattr(node.value, "id", "") == "sys"):
            pytest.fail(f"{path.name}:{node.lineno}: sys.exit in library code")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_subprocess_only_in_run_py(path):
    """One helper runs external commands, with a deadline (run.py)."""
    allowed = {"run.py"}
    if path.name in allowed:
        return
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "subprocess" \
                and node.attr in ("run", "call", "check_call", "check_output", "Popen"):
            pytest.fail(f"{path.name}:{node.lineno}: subprocess.{node.attr}; "
                        "use qemupatch.run (run, stream or spawn)")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_environment_read_only_by_config(path):
    """Settings enter once, through config.load; the library takes them as
    arguments (run.py only passes the environment on to children)."""
    if path.name in ("config.py", "run.py"):
        return
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "os" \
                and node.attr in ("environ", "getenv"):
            pytest.fail(f"{path.name}:{node.lineno}: os.{node.attr}; add it to config.Settings")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_one_clock_one_atomic_write_one_junit(path):
    """Timestamps, atomic files and JUnit XML come from records.py."""
    if path.name == "records.py":
        return
    text = path.read_text()
    for banned, use in (("datetime.now(", "records.utc_now"),
                        ("time.strftime(", "records.utc_now"),
                        ("os.replace(", "records.atomic_write"),
                        ('"testsuite"', "records.junit_xml")):
        assert banned not in text, f"{path.name}: {banned} -- use {use}"


def test_ruff_finds_no_errors():
    """Undefined names, unused imports and syntax errors fail the build."""
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9",
                          "--output-format", "concise", str(PACKAGE), str(PACKAGE.parent / "tests")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
