"""The README's and docs/'s code runs as written, so it cannot drift from the library."""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def _blocks(page):
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """Each page's blocks run in order in one namespace (a reader goes on from the block
    before), in a scratch directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # pages import examples/ from the repository root
    namespace = {}
    for block in _blocks(page):
        exec(compile(block, page, "exec"), namespace)
    if page == "README.md":
        assert (tmp_path / "adapter.safetensors").exists()


def test_pages_link_to_pages_that_exist():
    missing = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            if not (ROOT / page).parent.joinpath(target).exists():
                missing.append(f"{page}: {target}")
    assert not missing, missing


def test_the_readme_is_short_and_every_page_has_code_or_is_linked():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert all(os.path.basename(p) in readme or p == "README.md" for p in PAGES)
