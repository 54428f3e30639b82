"""`foldforge bench data` runs on the bundled sample and writes a complete results row."""
import json

from foldforge.cli import main
from foldforge.data.prepare import SAMPLE_DIR


def test_bench_data_row(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["prepare", "--out", str(cache), "--quiet", "--workers", "1"]) == 0
    results = tmp_path / "r.jsonl"
    assert main(["bench", "data", "--data", str(cache), "--preset", "tiny_af2", "--samples", "2",
                 "--msa-chain", str(SAMPLE_DIR / "alignments" / "4zey_A"), "--results", str(results)]) == 0
    row = json.loads(results.read_text().splitlines()[-1])
    for key in ("date", "cpu", "torch", "numpy", "commit", "command", "per_sample", "build", "stages_mean_ms"):
        assert key in row
    assert row["shapes"] == {"crop": 64, "n_clust": 16, "n_extra": 32, "n_templ": 2, "recycle_copies": 2}
    assert len(row["records"]) == 13 and row["records"][-1]["id"].endswith("(MSA only)")
    assert row["per_sample"]["median_ms"] > 0 and "agreement" in row["stages_mean_ms"]
