"""The README's configuration table is the user's reference: it must list
every config key with its real default and each board profile's value."""
import json
import re
import subprocess
import sys

from conftest import REPO


def test_readme_config_table_matches_schema_and_profiles():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "config_table.py")],
                         capture_output=True, text=True, check=True).stdout
    readme = (REPO / "README.md").read_text()
    missing = [line for line in out.splitlines() if line.startswith("| `") and line not in readme]
    assert not missing, "README config table is stale; rows that differ:\n" + "\n".join(missing)


def test_every_board_profile_config_key_is_a_schema_key():
    keys = set(re.findall(r"^\| `([a-z_]+)` \|", (REPO / "README.md").read_text(), re.M))
    for p in (REPO / "boards").glob("*.json"):
        extra = set(json.loads(p.read_text())["config"]) - keys
        assert not extra, "%s sets keys the README does not document: %s" % (p.name, extra)
