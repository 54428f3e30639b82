"""``foldforge prepare``: raw structures, MSAs and template hits -> ahead-of-time feature cache.

One job per structure file, run in parallel worker processes. Each job parses the file once and writes one
record per protein chain (atomically, see ``cache.py``). A chain that cannot be used is reported with its
reason and skipped; nothing partial is written. Re-running skips records whose inputs and options are
unchanged, so an interrupted run resumes where it stopped. The manifest is rewritten at the end.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from foldforge.data import residue_constants as rc
from foldforge.data.cache import (CacheError, read_header, record_relpath, write_manifest, write_record)
from foldforge.data.features import (RECORD_SCHEMA, FeatureError, build_record, check_msa_matches,
                                     single_sequence_msa)
from foldforge.data.mmcif import Structure, StructureError, parse_structure
from foldforge.data.msa import MSAError, load_chain_msas

STRUCTURE_SUFFIXES = (".cif", ".cif.gz", ".mmcif", ".pdb", ".pdb.gz", ".ent", ".ent.gz")
SAMPLE_DIR = Path(__file__).parent / "sample"


@dataclass
class PrepareOptions:
    mmcif_dir: str
    out: str
    msa_dir: str | None = None              # AF2 layout: <msa_dir>/<pdb>_<chain>/*.a3m|*.sto|*.hhr
    template_mmcif_dir: str | None = None   # enables templates (hits read from each chain's MSA dir)
    max_template_hits: int = 20
    max_template_date: str | None = None    # absolute cutoff (YYYY-MM-DD)
    template_gap_days: int = 60             # templates must predate the query release by this much
    max_msa_depth: int = 16384
    allow_missing_msa: bool = False         # chains without an MSA dir fall back to single sequence
    clusters: str | None = None             # file: one cluster per line, members "<pdb>_<chain>"
    min_length: int = 1
    workers: int = 0                        # 0 = all CPU cores
    force: bool = False                     # rebuild records even if they are up to date

    def content_key(self) -> str:
        """Options that change record contents (not where or how fast they are written)."""
        keys = ("msa_dir", "template_mmcif_dir", "max_template_hits", "max_template_date",
                "template_gap_days", "max_msa_depth", "allow_missing_msa", "min_length")
        return json.dumps({"schema": RECORD_SCHEMA, **{k: getattr(self, k) for k in keys}}, sort_keys=True)


@dataclass
class JobResult:
    entries: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # non-protein chains, kept on record
    reused: int = 0


def find_structures(mmcif_dir: str | Path) -> list[Path]:
    root = Path(mmcif_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"structure directory {root} does not exist")
    files = [p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(STRUCTURE_SUFFIXES)]
    return sorted(files)


def read_clusters(path: str | Path) -> dict[str, str]:
    """Cluster file (e.g. PDB ``clusters-by-entity-40.txt`` with chain ids): line number = cluster id."""
    mapping = {}
    for i, line in enumerate(Path(path).read_text().splitlines()):
        for member in line.split():
            mapping[member.lower()] = str(i)
    return mapping


def _input_key(path: Path, opts: PrepareOptions) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{opts.content_key()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _template_cutoff(structure: Structure, opts: PrepareOptions) -> str | None:
    dates = []
    if opts.max_template_date:
        dates.append(opts.max_template_date)
    if structure.release_date:
        query = dt.date.fromisoformat(structure.release_date)
        dates.append((query - dt.timedelta(days=opts.template_gap_days)).isoformat())
    return min(dates) if dates else None


_FEATURIZERS: dict[tuple, Any] = {}


def _templates_for(structure: Structure, chain, chain_dir: Path | None, opts: PrepareOptions):
    """Template features for one chain from the hit files in its MSA directory (hhr / sto / m8)."""
    from foldforge.data import templates as tpl

    if opts.template_mmcif_dir is None or chain_dir is None:
        return None, {}
    hits = tpl.load_chain_hits(chain_dir, chain.sequence)
    key = (opts.template_mmcif_dir, opts.max_template_hits)
    if key not in _FEATURIZERS:  # one featurizer per worker process: it caches parsed template files
        _FEATURIZERS[key] = tpl.TemplateFeaturizer(opts.template_mmcif_dir, max_hits=opts.max_template_hits)
    feats = _FEATURIZERS[key].featurize(chain.sequence, hits, release_date_cutoff=_template_cutoff(structure, opts),
                                        query_pdb_id=structure.pdb_id)
    arrays = {k: getattr(feats, k) for k in ("template_aatype", "template_all_atom_positions",
                                             "template_all_atom_mask", "template_sum_probs")}
    meta = {"template_domain_names": list(feats.template_domain_names),
            "template_rejected": [list(r) for r in feats.rejected][:50]}
    return arrays, meta


def _chain_job(structure: Structure, chain, opts: PrepareOptions, record_id: str, out: Path,
               key: str, clusters: dict[str, str]) -> dict[str, Any]:
    if chain.num_residues < max(1, opts.min_length):
        raise FeatureError(f"chain has {chain.num_residues} residues (minimum {max(1, opts.min_length)})")
    if (chain.aatype == rc.UNK_ID).all():
        raise FeatureError("chain contains only unknown residues")
    if chain.num_observed == 0:
        raise FeatureError("chain has no observed CA atoms")
    chain_dir = None
    if opts.msa_dir is not None:
        chain_dir = Path(opts.msa_dir) / record_id
        if not chain_dir.is_dir():
            chain_dir = None
            if not opts.allow_missing_msa:
                raise FeatureError(f"no alignment directory {Path(opts.msa_dir) / record_id} "
                                   f"(use --allow-missing-msa for single-sequence mode)")
    if chain_dir is not None:
        msa = load_chain_msas(chain_dir, max_depth=opts.max_msa_depth)
        check_msa_matches(chain.sequence, msa, source=str(chain_dir))
    else:
        msa = single_sequence_msa(chain.sequence)
    templates, template_meta = _templates_for(structure, chain, chain_dir, opts)
    arrays, meta = build_record(structure, chain, msa, templates, template_meta)
    meta["prepare_key"] = key
    meta["cluster_id"] = clusters.get(record_id.lower())
    rel = record_relpath(record_id)
    checksum = write_record(out / rel, record_id, arrays, meta)
    return _entry(record_id, rel, checksum, meta, (out / rel).stat().st_size)


def _entry(record_id: str, rel: str, checksum: str, meta: dict, nbytes: int) -> dict[str, Any]:
    return {"id": record_id, "path": rel, "checksum": checksum, "length": meta["length"],
            "num_observed": meta["num_observed"], "resolution": meta["resolution"],
            "release_date": meta["release_date"], "cluster_id": meta.get("cluster_id"),
            "msa_depth": meta["msa_depth"], "num_templates": meta["num_templates"],
            "source": meta["source"], "nbytes": nbytes}


def _reuse(out: Path, record_id: str, key: str) -> dict[str, Any] | None:
    rel = record_relpath(record_id)
    path = out / rel
    if not path.is_file():
        return None
    try:
        header = read_header(path)
    except CacheError:
        return None
    if header["meta"].get("prepare_key") != key:
        return None
    return _entry(record_id, rel, header["checksum"], header["meta"], path.stat().st_size)


def prepare_structure(path: Path, opts: PrepareOptions, clusters: dict[str, str]) -> JobResult:
    """Worker: all protein chains of one structure file."""
    result = JobResult()
    out = Path(opts.out)
    try:
        structure = parse_structure(path)
    except StructureError as e:
        result.failed.append({"input": str(path), "chain": None, "reason": str(e)})
        return result
    key = _input_key(path, opts)
    for chain_id, _kind in structure.other_chains:
        result.skipped.append({"input": str(path), "chain": chain_id, "reason": f"not a protein chain ({_kind})"})
    for chain_id, chain in structure.chains.items():
        record_id = f"{structure.pdb_id}_{chain_id}"
        if not opts.force and (entry := _reuse(out, record_id, key)) is not None:
            result.entries.append(entry)
            result.reused += 1
            continue
        try:
            result.entries.append(_chain_job(structure, chain, opts, record_id, out, key, clusters))
        except (FeatureError, MSAError, StructureError, ValueError, OSError) as e:
            result.failed.append({"input": str(path), "chain": chain_id, "reason": f"{type(e).__name__}: {e}"})
        except Exception as e:  # a bug, not bad input: report it per chain instead of losing the whole run
            result.failed.append({"input": str(path), "chain": chain_id,
                                  "reason": f"internal error {type(e).__name__}: {e} (please report)"})
    return result


def _clean_temp_files(out: Path) -> None:
    for tmp in out.glob("records/*/.*.tmp"):  # left by a killed run; never part of the cache
        tmp.unlink(missing_ok=True)


def run_prepare(opts: PrepareOptions, *, progress: bool = True) -> JobResult:
    """Prepare every structure, write the manifest and return the merged result of all jobs."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_temp_files(out)
    files = find_structures(opts.mmcif_dir)
    clusters = read_clusters(opts.clusters) if opts.clusters else {}
    total = JobResult()
    workers = opts.workers or os.cpu_count() or 1
    for res in _map(files, opts, clusters, workers, progress):
        total.entries += res.entries
        total.failed += res.failed
        total.skipped += res.skipped
        total.reused += res.reused
    write_manifest(out, total.entries, total.failed, {"prepare": asdict(opts)}, skipped=total.skipped)
    return total


def _map(files: list[Path], opts, clusters, workers: int, progress: bool) -> Iterator[JobResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(files), desc="prepare", unit="file", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(files) <= 1:
            for f in files:
                yield prepare_structure(f, opts, clusters)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(files))) as pool:
            futures = [pool.submit(prepare_structure, f, opts, clusters) for f in files]
            for fut in as_completed(futures):
                yield fut.result()
                bar.update()
    finally:
        bar.close()
