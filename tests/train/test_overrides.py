"""`--set key=value` overrides (typed by the dataclass field) and the resume rules of the run config."""
import json

import pytest

from foldforge.config import RunConfig
from foldforge.presets import tiny_af2
from foldforge.train.checkpoint import RUN_LENGTH_KEYS, apply_overrides, config_changes, resolve_config
from foldforge.train.distributed import DistEnv


def test_values_are_typed_by_the_field():
    cfg = tiny_af2()
    keys = apply_overrides(cfg, ["train.lr=5e-4", "model.evoformer.num_blocks=4", "train.target_lddt=0.5",
                                 "data.block_delete_msa=false", "train.adam_betas=0.8,0.95", "name=exp1",
                                 "model.chunk_size=none", "train.schedule=constant"])
    assert keys[:2] == ["train.lr", "model.evoformer.num_blocks"]
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.evoformer.num_blocks == 4 and isinstance(cfg.model.evoformer.num_blocks, int)
    assert cfg.train.target_lddt == 0.5 and cfg.data.block_delete_msa is False
    assert cfg.train.adam_betas == (0.8, 0.95) and cfg.name == "exp1" and cfg.model.chunk_size is None
    apply_overrides(cfg, ["model.chunk_size=16", "train.target_lddt=None", "train.max_steps=50_000"])
    assert cfg.model.chunk_size == 16 and cfg.train.target_lddt is None and cfg.train.max_steps == 50_000
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("item, message", [
    ("train.lrr=1", "unknown key 'lrr' in train; did you mean lr"),
    ("trian.lr=1", "unknown key 'trian' in the run config; did you mean train"),
    ("model.evoformer.blocks=2", "unknown key 'blocks' in model.evoformer"),
    ("train.max_steps=1.5", "not a valid int"),
    ("train.lr=fast", "not a valid float"),
    ("data.block_delete_msa=maybe", "not a valid bool"),
    ("train.adam_betas=0.9", "not a valid tuple"),
    ("model.evoformer=3", "is a section"),
    ("train.lr.x=1", "is a value, not a section"),
    ("train.lr", "expects key=value"),
])
def test_bad_overrides_are_clear_errors(item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(tiny_af2(), [item])


def test_resume_accepts_only_run_length_overrides(tmp_path):
    env = DistEnv()
    run = tmp_path / "run"
    cfg, run_dir, data = resolve_config(env, preset="tiny_af2", data="some/cache", out=str(run), resume=False,
                                        overrides=["train.lr=5e-4"], max_steps=10)
    assert data == "some/cache" and RunConfig.load(run / "config.json") == cfg and cfg.train.max_steps == 10
    with pytest.raises(FileExistsError, match="--resume"):
        resolve_config(env, preset=None, data=None, out=str(run), resume=False)
    cfg2, _, data2 = resolve_config(env, preset=None, data=None, out=str(run), resume=True,
                                    overrides=["train.eval_every=5"], max_steps=20, target_lddt=0.7)
    assert data2 == "some/cache" and cfg2.train.lr == 5e-4 and cfg2.train.max_steps == 20
    assert RunConfig.load(run / "config.json").train.target_lddt == 0.7   # written back
    assert config_changes(cfg.to_dict(), cfg2.to_dict()) == ["train.eval_every", "train.max_steps",
                                                             "train.target_lddt"]
    assert set(config_changes(cfg.to_dict(), cfg2.to_dict())) <= RUN_LENGTH_KEYS
    resolve_config(env, preset="tiny_af2", data=None, out=str(run), resume=True, overrides=["train.lr=5e-4"])
    with pytest.raises(ValueError, match="cannot change train.lr"):
        resolve_config(env, preset=None, data=None, out=str(run), resume=True, overrides=["train.lr=1e-3"])
    with pytest.raises(ValueError, match="'tiny_af2' run"):
        resolve_config(env, preset="af2_initial", data=None, out=str(run), resume=True)
    with pytest.raises(FileNotFoundError):
        resolve_config(env, preset=None, data=None, out=str(tmp_path / "none"), resume=True)
    with pytest.raises(ValueError, match="needs --out"):
        resolve_config(env, preset=None, data=None, out=None, resume=True)
