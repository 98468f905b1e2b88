"""The job-kind registry: kinds are found by name, and what a kind declares is what pre-flight,
the CPU budget and the GPU checks act on."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k3batch import gpus
from k3batch.config import load_config
from k3batch.job import kinds
from k3batch.job.preflight import preflight
from k3batch.ray_start.budget import reserved_cpus

from .conftest import job_config


def test_an_unknown_kind_is_refused_naming_the_module_it_looked_for():
    with pytest.raises(ValueError, match=r"job: no job kind 'restyle' \(no module pipelines/re"):
        kinds.get("restyle")


def test_a_beautify_job_keeps_its_records_in_metadata_whatever_the_output_format(
    tmp_path, tiny_dir
):
    pq.write_table(pa.table({"prompt": ["a cat"]}), tmp_path / "in.parquet")
    data = job_config(tmp_path, str(tmp_path / "in.parquet"), tiny_dir)
    data["job"] = "beautify"
    data["beautify"] = {"enabled": True, "backend": "openai", "openai": {"base_url": "http://x"}}
    data["output"]["format"] = "webdataset"
    cfg = load_config(data=data)
    _, _, output, resumed = preflight(cfg, kinds.get(cfg.job))
    assert not resumed and output.format.records_dir == "metadata"
    text = dict(data, job="text_to_image", beautify={})
    cfg = load_config(data={**text, "output": {**data["output"], "overwrite": True}})
    _, _, output, _ = preflight(cfg, kinds.get(cfg.job))
    assert output.format.records_dir == "shards"


def test_the_cpu_budget_and_the_gpu_check_read_the_same_pools(tmp_path, tiny_dir):
    data = job_config(tmp_path, "in.parquet", tiny_dir)
    data["resources"] = {
        "num_actors": 3,
        "num_cpus_per_actor": 2,
        "num_gpus_per_actor": 1,
        "text_encoder_pool": {"enabled": True, "num_actors": 2, "num_cpus_per_actor": 1},
    }
    cfg = load_config(data=data)
    kind = kinds.get(cfg.job)
    pools = kind.pools(cfg)
    assert [p.name for p in pools] == ["resources (generation)", "resources.text_encoder_pool"]
    assert reserved_cpus(cfg, kind) == 3 * 2 + 2 * 1
    assert [p.describe() for p in gpus.gpu_pools(cfg, kind)] == ["resources (generation) 3 x 1"]
