"""The runnable examples of the README and the docs pages run as written (blocks that start with '# example:'),
and the README's test command is what CI runs."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_examples_run():
    pages = [README, *sorted((README.parent / "docs").glob("*.md"))]
    blocks = [(page, b) for page in pages for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]
    runnable = [(page, block) for page, block in blocks if block.startswith("# example:")]
    assert {page.name for page, _ in runnable} >= {"README.md", "adapters.md"}, "a page lost its runnable example"
    for page, block in runnable:
        exec(compile(block, str(page), "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    """The command under "The two commands" that runs the tests is the last command .ci/run runs."""
    section = README.read_text().split("## The two commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in section.splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].startswith("minimoe train")
    ci = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == commands[1]
