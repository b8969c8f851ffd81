"""The README is the user's manual: it must document every setting and carry the commands CI runs."""
import dataclasses
from pathlib import Path

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_environment_variable_is_in_the_table_with_its_default():
    for f in dataclasses.fields(tg.Hyperparameters):
        default = {True: "1", False: "0"}.get(f.default, f.default) if isinstance(f.default, bool) else f.default
        if default == "":
            default = "(random)" if f.name == "run_id" else "(empty)"
        assert f"| `{f.name.upper()}` | `{default}` |" in README, f.name


def test_the_first_commands_are_the_demo_and_the_ci_test_command():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert "scripts/demo.sh" in first_block.splitlines()[0]
    assert ci_command in first_block.splitlines()[1]
