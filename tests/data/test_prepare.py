"""`foldforge prepare` / `foldforge info` end to end on real data, including the bad-input cases."""
import gzip
import json
import shutil
from pathlib import Path

import pytest

from foldforge.cli import main
from foldforge.data.cache import FeatureCache
from foldforge.data.prepare import SAMPLE_DIR

from tests.paths import SHARED, needs_shared


def _info(capsys, *args):
    capsys.readouterr()
    code = main(["info", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "cache"
    assert main(["prepare", "--out", str(out), "--quiet", "--workers", "2"]) == 0
    return out


def test_sample_prepares_every_chain(sample_cache, capsys):
    code, info = _info(capsys, "--data", str(sample_cache), "--verify")
    assert code == 0 and info["failed"] == 0 and info["corrupt"] == []
    cache = FeatureCache(sample_cache)
    ids = set(cache.ids())
    # 7 PDB entries (10 protein chains) with MSAs + 2 PSICOV domains in single-sequence mode
    assert {"4zey_A", "2q2k_A", "2q2k_B", "3u8v_A", "1psm_A", "1aap_A", "1c52_A"} <= ids
    assert info["records"] == len(ids) == 12
    assert info["skipped_non_protein"] >= 1  # the DNA chains of 2q2k
    by_id = {e["id"]: e for e in cache.entries}
    assert by_id["1aap_A"]["msa_depth"] == 1 and by_id["4zey_A"]["msa_depth"] > 100
    assert any(e["num_templates"] > 0 for e in cache.entries)
    assert not list(sample_cache.rglob("*.tmp"))


def test_rerun_skips_up_to_date_records(sample_cache, capsys):
    before = {p: p.stat().st_mtime_ns for p in sample_cache.rglob("*.ffr")}
    capsys.readouterr()
    assert main(["prepare", "--out", str(sample_cache), "--quiet", "--workers", "1"]) == 0
    assert "(12 already up to date)" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in sample_cache.rglob("*.ffr")}


def test_corrupt_record_is_reported_by_verify(sample_cache, tmp_path, capsys):
    copy = tmp_path / "c"
    shutil.copytree(sample_cache, copy)
    victim = sorted(copy.rglob("*.ffr"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    code, info = _info(capsys, "--data", str(copy), "--verify")
    assert code == 1 and [c["id"] for c in info["corrupt"]] == [victim.stem]


def _bad_inputs(tmp_path: Path) -> tuple[Path, Path]:
    mm, msa = tmp_path / "mmcif", tmp_path / "msa"
    mm.mkdir()
    text = gzip.open(SAMPLE_DIR / "mmcif" / "3zee.cif.gz", "rt").read()
    (mm / "3zee.cif").write_text(text)                       # good structure, bad a3m below
    (mm / "9trn.cif").write_text(text[: len(text) // 2])      # truncated
    (mm / "9emp.cif").write_text("")                          # empty
    shutil.copy(SAMPLE_DIR / "mmcif" / "4zey.cif.gz", mm)     # good, but no alignment directory
    lig = "HETATM    1  C1  LIG A   1       1.000   2.000   3.000  1.00 10.00           C\nEND\n"
    (mm / "9lig.pdb").write_text(lig)                          # no polymer chain at all
    unk = "".join(f"ATOM  {i + 1:5d}  CA  UNK A{i + 1:4d}    {i * 3.8:8.3f}   0.000   0.000  1.00 10.00           C\n"
                  for i in range(5))
    (mm / "9unk.pdb").write_text(unk + "END\n")                # unknown residues only
    (msa / "3zee_A").mkdir(parents=True)
    (msa / "3zee_A" / "bfd_uniclust_hits.a3m").write_text(">query\nMKV\n>hit\nMKVL\n")
    for pdb in ("9unk_A",):
        (msa / pdb).mkdir()
        (msa / pdb / "bfd_uniclust_hits.a3m").write_text(">query\nXXXXX\n")
    return mm, msa


def test_bad_inputs_are_reported_and_skipped(tmp_path, capsys):
    mm, msa = _bad_inputs(tmp_path)
    out = tmp_path / "cache"
    code = main(["prepare", "--mmcif-dir", str(mm), "--msa-dir", str(msa), "--out", str(out), "--quiet",
                 "--workers", "2"])
    printed = capsys.readouterr().out
    assert code == 1, printed  # nothing could be prepared
    reasons = {(Path(f["input"]).name, f["chain"]): f["reason"] for f in json.loads((out / "manifest.json").read_text())["failed"]}
    assert "cannot parse" in reasons[("9trn.cif", None)]
    assert "empty" in reasons[("9emp.cif", None)]
    assert "no polymer" in reasons[("9lig.pdb", None)]
    assert "only unknown residues" in reasons[("9unk.pdb", "A")]
    assert "no alignment directory" in reasons[("4zey.cif.gz", "A")]
    assert "bfd_uniclust_hits.a3m" in reasons[("3zee.cif", "A")]
    assert not list(out.rglob("*.ffr")) and not list(out.rglob("*.tmp"))
    # the same inputs with single-sequence fallback prepare the usable chains; exit code 0
    code = main(["prepare", "--mmcif-dir", str(mm), "--out", str(out), "--quiet", "--workers", "1"])
    assert code == 0 and set(FeatureCache(out).ids()) == {"3zee_A", "4zey_A"}


def test_missing_directory_is_an_error(tmp_path, capsys):
    assert main(["prepare", "--mmcif-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err


@needs_shared
def test_psicov_single_sequence_mode(tmp_path, capsys):
    out = tmp_path / "psicov"
    assert main(["prepare", "--mmcif-dir", str(SHARED / "psicov150_structures" / "pdb"), "--out", str(out),
                 "--quiet", "--workers", "2"]) == 0
    code, info = _info(capsys, "--data", str(out))
    assert info["records"] == 120 and info["failed"] == 0 and info["msa_depth_median"] == 1


@needs_shared
def test_openfold_testdata_with_msas_and_templates(tmp_path, capsys):
    src = SHARED / "openfold_af2_testdata"
    out = tmp_path / "of"
    assert main(["prepare", "--mmcif-dir", str(src / "mmcifs"), "--msa-dir", str(src / "alignments_per_chain"),
                 "--template-mmcif-dir", str(src / "mmcifs"), "--out", str(out), "--quiet", "--workers", "2"]) == 0
    code, info = _info(capsys, "--data", str(out))
    cache = FeatureCache(out)
    # every protein chain of the 8 entries has alignments: 1 + 1 + 2 + 2 + 1 + 2 + 1 + 12
    assert info["records"] == 22 and info["failed"] == 0
    assert min(e["msa_depth"] for e in cache.entries) > 1
