"""Shared fixtures of the training tests: one prepared copy of the bundled sample per session."""
import pytest

from foldforge.data.prepare import SAMPLE_DIR, PrepareOptions, run_prepare


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_cache")
    run_prepare(PrepareOptions(mmcif_dir=str(SAMPLE_DIR / "mmcif"), out=str(out), workers=1,
                               msa_dir=str(SAMPLE_DIR / "alignments"),
                               template_mmcif_dir=str(SAMPLE_DIR / "mmcif"), allow_missing_msa=True),
                progress=False)
    return out
