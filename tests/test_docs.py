"""The front door: README.md short, with the result, the paper and the tutorial on its first
screen, a citation and a license; every relative link of the project's Markdown pages leads to a file."""
import re

from helpers import ROOT

PAGES = ["README.md", "results/README.md", "fast/README.md", "docs/model.md"]


def test_readme_says_what_it_is_and_achieves_on_its_first_screen():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 8000
    first_screen = "\n".join(readme.splitlines()[:30])
    for needed in ("arxiv.org/abs/2201.09792", "95.88%", "96.03%", "tutorial.ipynb", "convmixer.py"):
        assert needed in first_screen, needed
    assert "@article{" in readme and "LICENSE" in readme
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_every_relative_link_leads_to_a_file():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)      # not code
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if "://" not in target:
                assert ((ROOT / page).parent / target).exists(), (page, target)
