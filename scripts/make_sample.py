"""Rebuild the bundled sample (foldforge/data/sample/) from the shared real-data folder.

Real PDB entries with their AF2-layout MSAs trimmed to a few hundred rows, template hits restricted to
entries that are bundled (plus the first few others, which `prepare` reports as missing), and two PSICOV
single-chain PDB files for single-sequence mode. Usage: python scripts/make_sample.py [SHARED_DATA_DIR]
"""
from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

ENTRIES = ["1psm", "2crb", "2q2k", "3u8v", "3zee", "4i6p", "4zey"]
PSICOV = ["1aap", "1c52"]
MSA_ROWS = 256
TEMPLATE_OTHERS = 5
OUT = Path(__file__).resolve().parents[1] / "foldforge" / "data" / "sample"


def trim_a3m(text: str, rows: int) -> str:
    records = text.split(">")[1: rows + 1]
    return "".join(">" + r for r in records)


def trim_sto(text: str, keep) -> str:
    """Keep Stockholm rows whose sequence name passes ``keep(index, name)``.

    The index is the order of the sequence lines (the query first), not of the ``#=GS`` annotations,
    which need not include the query.
    """
    lines = text.splitlines()
    order: dict[str, int] = {}
    for line in lines:
        if line.strip() and not line.startswith(("#", "//")):
            order.setdefault(line.split()[0], len(order))
    out = []
    for line in lines:
        parts = line.split()
        if line.startswith(("#=GS", "#=GR")) and len(parts) > 1:
            name = parts[1]
        elif parts and not line.startswith(("#", "//")):
            name = parts[0]
        else:
            out.append(line)
            continue
        if name in order and keep(order[name], name):
            out.append(line)
    return "\n".join(out) + "\n"


def main(shared: Path) -> None:
    src = shared / "openfold_af2_testdata"
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "mmcif").mkdir(parents=True)
    for pdb in ENTRIES:
        with open(src / "mmcifs" / f"{pdb}.cif", "rb") as f, gzip.open(OUT / "mmcif" / f"{pdb}.cif.gz", "wb", 9) as g:
            g.write(f.read())
    for pdb in PSICOV:
        with open(shared / "psicov150_structures" / "pdb" / f"{pdb}.pdb", "rb") as f, \
                gzip.open(OUT / "mmcif" / f"{pdb}.pdb.gz", "wb", 9) as g:
            g.write(f.read())
    bundled = set(ENTRIES)
    for chain_dir in sorted((src / "alignments_per_chain").iterdir()):
        if chain_dir.name.split("_")[0] not in bundled:
            continue
        dst = OUT / "alignments" / chain_dir.name
        dst.mkdir(parents=True)
        for f in sorted(chain_dir.iterdir()):
            text = f.read_text()
            if f.name == "uniprot_hits.sto":
                continue  # multimer pairing only
            if f.name == "hmm_output.sto":  # template hits: the query, bundled entries, a few others
                text = trim_sto(text, lambda i, n: i == 0 or n[:4] in bundled or i <= TEMPLATE_OTHERS)
            elif f.suffix == ".a3m":
                text = trim_a3m(text, MSA_ROWS)
            else:
                text = trim_sto(text, lambda i, n: i < MSA_ROWS)
            (dst / f.name).write_text(text)
    (OUT / "README.md").write_text(ATTRIBUTION)


ATTRIBUTION = """# Bundled sample data

Real public data, trimmed for the demo and tests (built by `scripts/make_sample.py`).

- `mmcif/*.cif.gz`: PDB entries 1psm, 2crb, 2q2k, 3u8v, 3zee, 4i6p, 4zey (wwPDB, CC0), as distributed in the
  test data of aqlaboratory/openfold (Apache-2.0).
- `mmcif/*.pdb.gz`: PSICOV benchmark domains 1aap, 1c52 (wwPDB coordinates, CC0), renumbered from 1, as
  distributed by bestlab/GREMLIN_RF.
- `alignments/<pdb>_<chain>/`: AF2-layout MSAs from aqlaboratory/openfold test data (Apache-2.0); the
  sequences derive from UniProt/UniRef and BFD (CC BY 4.0) and MGnify (CC0). Each MSA file is cut to its
  first 256 rows; `hmm_output.sto` (template hits from hmmsearch against PDB seqres) keeps the query, the
  bundled entries and the first five other hits.
"""

if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data")
