"""Merge tuned-table fragments ({"<op>": {bucket: entry}, ...}) into foldforge/kernels/tuned/<slug>.json.
Usage: python scripts/merge_tuned.py SLUG FRAGMENT.json [...]"""
import json
import sys
from pathlib import Path

slug, frags = sys.argv[1], sys.argv[2:]
path = Path(__file__).resolve().parents[1] / "foldforge" / "kernels" / "tuned" / f"{slug}.json"
table = json.loads(path.read_text()) if path.exists() else {}
for f in frags:
    frag = json.loads(Path(f).read_text())
    for op, entries in frag.items():
        if isinstance(entries, dict) and op not in ("gpu", "torch", "date", "how"):
            table.setdefault(op, {}).update(entries)
            table.setdefault("_sources", {}).setdefault(op, []).append(
                {k: frag.get(k) for k in ("gpu", "torch", "date", "how")})
path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
print(f"wrote {path}")
