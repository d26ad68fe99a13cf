"""Parts of the docs written from a record, between markers.

A measuring tool records what it measured in a JSON file under docs/ and
writes the figures into the docs from that record only, between

    <!-- NAME:begin (written by COMMAND from docs/RECORD.json; do not edit) -->
    ...
    <!-- NAME:end -->

host_tests/test_doc_figures.py renders every region again from its record
and fails, naming the command, when the text differs. The tools using this:
tools/wear/storebench.py, tools/bench/dashsizes.py, tools/bench/partsmem.py.
"""
import argparse
import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Region:
    """One generated part of a doc: its marker name, the doc (a path
    relative to the repository), and how it is made from the record."""

    def __init__(self, name, doc, render):
        self.name, self.doc, self.render = name, doc, render

    def end(self):
        return "<!-- %s:end -->" % self.name

    def begin(self, command, record):
        return "<!-- %s:begin (written by %s from %s; do not edit) -->" % (self.name, command, record)

    def find(self, text):
        # -> (index of the begin marker, of the body, of the end marker); ValueError when missing.
        head = "<!-- %s:begin " % self.name
        i = text.find(head)
        k = text.find("-->", i) + 3 if i >= 0 else -1
        j = text.find("\n" + self.end(), k)
        if i < 0 or k < 3 or j < 0 or text.count(head) != 1:
            raise ValueError("%s has no single %s...%s pair of markers" % (self.doc, head.strip(), self.end()))
        return i, k + 1, j

    def current(self, text):
        """The region as the doc has it: (its begin line, its body)."""
        i, k, j = self.find(text)
        return text[i:k - 1], text[k:j]


def stamp(watched=("lib", "firmware")):
    """Commit and date for a record; '+changes' when code under the watched
    paths differs from the commit."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=str(REPO)).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--", *watched], capture_output=True, text=True,
                            cwd=str(REPO)).stdout.splitlines()
    dirty = [line for line in status if not line.endswith(".md")]  # the docs these tools write do not count
    return {"commit": head + ("+changes" if dirty else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def twin_run(script, args=(), heap="110K", path=(".frozen", "host_tests"), binary="broker", timeout=900):
    """Run script (a path relative to the repository, or source text) on the
    board twin with MICROPYPATH=path; its stdout, or SystemExit with its
    output when it fails."""
    import twin  # tools/twin.py, on sys.path of every tool that imports this module

    with tempfile.TemporaryDirectory(prefix="docregion_") as tmp:
        if "\n" in script:
            Path(tmp, "script.py").write_text(script)
            script = str(Path(tmp, "script.py"))
        r = subprocess.run([str(twin.build(binary)), "-X", "heapsize=" + str(heap), script] + [str(a) for a in args],
                           capture_output=True, text=True, cwd=str(REPO), timeout=timeout, stdin=subprocess.DEVNULL,
                           env={"MICROPYPATH": os.pathsep.join(str(p) for p in path)})
    if r.returncode:
        raise SystemExit("%s %s failed:\n%s\n%s" % (script.splitlines()[0][:60], " ".join(map(str, args)),
                                                    r.stdout[-2000:], r.stderr[-2000:]))
    return r.stdout


def load(record):
    return json.loads((REPO / record).read_text())


def save(record, data):
    (REPO / record).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def write(regions, rec, command, record):
    """Rewrite every region's body (and begin line) from rec; returns the
    docs that changed."""
    changed = []
    for doc in sorted({r.doc for r in regions}):
        path = REPO / doc
        text = old = path.read_text()
        for r in regions:
            if r.doc == doc:
                i, k, j = r.find(text)
                text = text[:i] + r.begin(command, record) + "\n" + r.render(rec) + text[j:]
        if text != old:
            path.write_text(text)
            changed.append(doc)
    return changed


def stale(regions, rec, command, record):
    """The regions whose text is not what rec renders: [(region, why)]."""
    out = []
    texts = {}
    for r in regions:
        text = texts.setdefault(r.doc, (REPO / r.doc).read_text())
        try:
            head, body = r.current(text)
        except ValueError as e:
            out.append((r, str(e)))
            continue
        if head != r.begin(command, record):
            out.append((r, "its begin marker is not %r" % r.begin(command, record)))
        elif body != r.render(rec):
            out.append((r, "its text differs from what %s renders" % record))
    return out


def main(tool, measure, options=()):
    """The command line every such tool has: measure (measure(args) -> the
    record), save the record, write the docs; --docs-only writes the docs
    from the saved record. tool is the tool's module: its __doc__, RECORD,
    COMMAND and REGIONS; options are (flags, argparse keywords) of its own."""
    ap = argparse.ArgumentParser(description=tool.__doc__.split("\n\n")[0])
    for flags, kw in options:
        ap.add_argument(*flags, **kw)
    ap.add_argument("--docs-only", action="store_true", help="write the docs from the record, measure nothing")
    a = ap.parse_args()
    name = Path(tool.__file__).stem
    if a.docs_only:
        rec = load(tool.RECORD)
    else:
        rec = measure(a)
        save(tool.RECORD, rec)
        print("%s: wrote %s" % (name, tool.RECORD))
    for doc in write(tool.REGIONS, rec, tool.COMMAND, tool.RECORD):
        print("%s: wrote %s" % (name, doc))
    return 0
