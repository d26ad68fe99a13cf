#!/usr/bin/env python3
"""Print the config keys as a Markdown table: default, and each board
profile's value where it differs. The README's table is this output."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "firmware"), str(REPO / "lib")]
sys.modules.setdefault("micropython", type(sys)("micropython"))
sys.modules["micropython"].const = lambda x: x
from broker.config import SCHEMA  # noqa: E402

BOARDS = ("esp32", "esp32s3", "pico_w", "pico2_w", "unix")


def main():
    profs = {b: json.loads((REPO / "boards" / (b + ".json")).read_text()).get("config", {}) for b in BOARDS}
    print("| key | default | " + " | ".join(BOARDS) + " |")
    print("|---|---|" + "---|" * len(BOARDS))
    for k, (d, kind, lo, hi) in SCHEMA.items():
        row = [json.dumps(d)] + [json.dumps(profs[b][k]) if k in profs[b] else "" for b in BOARDS]
        print("| `%s` | %s |" % (k, " | ".join(row)))


if __name__ == "__main__":
    main()
