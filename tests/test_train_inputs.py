"""What a training run reads is what it was told: every committed manifest shard has its committed features (else the
run is refused before it starts, naming the missing shards), and a resume runs on the features its checkpoints
were trained on (else refused, naming the changed shard)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pixart.features.format import latent_files, text_files
from pixart.train import checkpoint
from pixart.train.prepare import check_run
from storage.commit import write_done
from storage.errors import ConfigError
from tests.test_train import config
from tests.train_cli import assert_one_error_line, train_cli


def copy_root(features: str, tmp_path: Path) -> str:
    """A private copy of the session's inputs (manifests, captions, features; no runs): the tests change it."""
    root = tmp_path / "root"
    for part in ("manifests", "captions", "features"):
        shutil.copytree(Path(features) / part, root / part)
    return str(root)


def test_a_run_on_features_missing_a_shard_is_refused_naming_it(features, tiny_t5_encoder, tmp_path):
    root = copy_root(features, tmp_path)
    cfg = config(root, "tiny-stage2", "partial", t5=tiny_t5_encoder)
    assert check_run(cfg)["shards"] == 2  # complete: accepted

    text = Path(text_files(root, "sam", "tiny", "sa_000001").index + ".done")
    marker = text.read_bytes()
    text.unlink()  # an extraction killed before its marker: the loader would skip the shard
    with pytest.raises(ConfigError, match=r"text-sa_000001 \(uncommitted\)") as e:
        check_run(cfg)
    assert "sa_000000" not in str(e.value) and "pixart extract sam" in str(e.value)
    text.write_bytes(marker)

    for base in (256, 512):  # no latents at all for one manifest shard, at either size
        index = latent_files(root, "sam", base, base == 512, "sa_000000").index
        for f in (index, index + ".done", index.removesuffix(".parquet") + ".tar"):
            Path(f).unlink()
    with pytest.raises(ConfigError, match=r"manifest shard \(2\) has its committed features, 1 missing: "
                       r"latents-sa_000000 \(missing\)\. The run would train on part of the data"):
        check_run(cfg)
    multi = config(root, "tiny-stage3", "partial-ms", "init_any_step=true", t5=tiny_t5_encoder)
    with pytest.raises(ConfigError, match=r"features/sam at 512-ms.*latents-sa_000000 \(missing\)"):
        check_run(multi)
    assert not (Path(root) / "runs").exists()  # refused before anything of a run is written


def test_a_shard_whose_every_row_is_an_error_still_counts(features, tiny_t5_encoder, tmp_path):
    from storage.parquet import read_rows, write_table

    root = copy_root(features, tmp_path)
    for files in (latent_files(root, "sam", 256, False, "sa_000000"), text_files(root, "sam", "tiny", "sa_000000")):
        rows = [{**r, "status": "error", "error": "duplicate of sa_000001"} for r in read_rows(files.index)]
        write_table(rows, files.index)  # e.g. every key a duplicate of another shard's: committed, all errors
    assert check_run(config(root, "tiny-stage2", "errors", "data.batch_size=1", t5=tiny_t5_encoder))["shards"] == 2


def test_a_resume_on_changed_features_is_refused_naming_the_shard(features, tiny_t5_encoder, tiny_vae, tmp_path):
    root = copy_root(features, tmp_path)
    args = ["tiny-stage2", f"output_root={root}", "run=moved", "data.caption_set=tiny", f"t5_model={tiny_t5_encoder}",
            f"vae_model={tiny_vae}", "schedule.max_steps=2"]
    assert train_cli(*args).exit_code == 0
    state = checkpoint.trainer_state(checkpoint.latest(root, "moved"))
    assert sorted(state["features"]) == ["latents-sa_000000", "latents-sa_000001", "text-sa_000000", "text-sa_000001"]

    index = latent_files(root, "sam", 256, False, "sa_000001").index
    marker = json.loads(Path(index + ".done").read_text())
    write_done(index, {**marker, "content_id": "re-extracted"})  # re-committed: another content id
    line = assert_one_error_line(train_cli(*args[:-1], "schedule.max_steps=4"), "latents-sa_000001 changed",
                                 "another run=")
    assert "sa_000000" not in line
    assert checkpoint.latest(root, "moved").endswith("step-000000002")  # nothing trained on the changed data

    write_done(index, marker)  # the features it was trained on: it resumes
    assert train_cli(*args[:-1], "schedule.max_steps=4").exit_code == 0
    assert checkpoint.latest(root, "moved").endswith("step-000000004")
