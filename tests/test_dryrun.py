"""`embedpipe embed --dry-run`: document counts (exact and estimated), the plan, the duration estimate."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import EmbedConfig
from pipeline.commands.dryrun import CPU_DOCS_PER_S_PER_CORE, GPU_DOCS_PER_S, count_documents, estimate_seconds
from pipeline.engine.plan import plan_resources
from pipeline.storage.sources import discover_shards
from tests.conftest import SAMPLE, assert_one_line_error, cli


def counts_of(directory) -> dict[str, tuple[int, str]]:
    return {c.shard.key: (c.documents, c.method) for c in map(count_documents, discover_shards(str(directory)))}


def test_small_shards_are_counted_exactly_in_every_format(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree")  # a blank line is no document; no final newline
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(7)))
    (tmp_path / "c.csv").write_text("text,n\n" + "".join(f"c{i},{i}\n" for i in range(5)))
    (tmp_path / "d.json").write_text(json.dumps([{"text": "x"}] * 4))
    pq.write_table(pa.table({"text": [f"p{i}" for i in range(11)]}), tmp_path / "e.parquet", row_group_size=3)
    datasets.Dataset.from_dict({"text": [f"h{i}" for i in range(6)]}).save_to_disk(str(tmp_path / "hf"))
    assert counts_of(tmp_path) == {
        "a.txt": (3, "counted"), "b.jsonl": (7, "counted"), "c.csv": (5, "counted"), "d.json": (4, "counted"),
        "e.parquet": (11, "parquet metadata"), "hf/data-00000-of-00001.arrow": (6, "counted"),
    }


def test_large_and_compressed_shards_are_estimated_from_a_sample(tmp_path):
    lines = "".join(f"document number {i:06d} with some words\n" for i in range(300_000))  # 12.6 MB, same length each
    (tmp_path / "big.txt").write_text(lines)
    with gzip.open(tmp_path / "big.txt.gz", "wt") as f:
        f.write(lines)
    counts = counts_of(tmp_path)
    assert counts["big.txt"][1] == "estimated" and counts["big.txt.gz"][1] == "estimated"
    assert counts["big.txt"][0] == pytest.approx(300_000, rel=0.01)  # equal lines: exact up to rounding
    assert counts["big.txt.gz"][0] == pytest.approx(300_000, rel=0.3)  # compression ratio of the first MiB only


def test_duration_estimate_cites_the_measured_cpu_and_gpu_throughput():
    config = EmbedConfig(input="x", output="y")
    cpu = plan_resources(config, {"CPU": 16.0}, nodes=2)  # 7 single-threaded encoders per node
    assert (cpu.num_encoders, cpu.encoder_threads) == (14, 1)
    seconds, basis = estimate_seconds(cpu, 100_000, config)
    assert seconds == pytest.approx(100_000 / (CPU_DOCS_PER_S_PER_CORE["onnx"] * 14))
    assert "BENCHMARKS.md" in basis and "float32 on ONNX Runtime" in basis
    # The rate follows the path the encoders will take: int8 and PyTorch were measured apart.
    int8 = EmbedConfig(input="x", output="y", dtype="int8")
    torch_cfg = EmbedConfig(input="x", output="y", backend="torch")
    remote = EmbedConfig(input="x", output="y", trust_remote_code=True)  # auto leaves it on PyTorch
    int8_s, int8_basis = estimate_seconds(cpu, 100_000, int8)
    torch_s, torch_basis = estimate_seconds(cpu, 100_000, torch_cfg)
    assert int8_s < seconds < torch_s and "int8 on ONNX Runtime" in int8_basis and "on PyTorch" in torch_basis
    assert estimate_seconds(cpu, 100_000, remote)[0] == torch_s
    gpu = plan_resources(config, {"CPU": 32.0, "GPU": 4.0}, nodes=4)
    seconds, basis = estimate_seconds(gpu, 4_000_000, EmbedConfig(input="x", output="y", model="some/other-model"))
    assert seconds == pytest.approx(4_000_000 / (4 * GPU_DOCS_PER_S))
    assert "one H100" in basis and "BENCHMARKS.md" in basis and "some/other-model may be much slower" in basis
    assert estimate_seconds(gpu, 0, config)[0] == 0


def test_dry_run_cli_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = cli("embed", "--input", SAMPLE, "--output", str(out), "--dry-run", "--encoders-per-node", "2",
               "--precision", "int8", "--truncate-dim", "128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "stored: int8 vectors, truncated to 128 dimensions; ranges from 2,000 sampled documents" in text
    assert "3 file(s) (shards)" in text and "en.txt (txt, 110.9 KiB): 1,000 documents (counted)" in text
    assert "files: 1 group(s) of shards, 1 of them small files packed together" in text  # the sample: ~150 KiB
    assert "documents: 1,500 in all" in text
    assert "1 to embed (3 shard(s)), about 1,500 documents in about 1 output file(s)" in text
    assert "tokenize: 1 actor(s) x 0.5 CPU" in text
    assert "encode:   2 actor(s) x 0.5 CPU, 1 thread(s) each (2 per node on 1 node(s))" in text
    assert "estimated duration: about" in text and "an estimate" in text
    assert not out.exists()


def test_dry_run_counts_only_shards_left_to_embed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("x\ny\n")
    (src / "b.txt").write_text("z\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt.parquet").write_bytes(b"committed by an earlier run")
    proc = cli("embed", "--input", str(src), "--output", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # an output of a version without plans: a file per shard, so a.txt's group is done
    assert "1 group(s) already committed (skipped), 1 to embed (1 shard(s)), about 1 documents" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["a.txt.parquet"]


def test_dry_run_with_bad_input_is_one_line(tmp_path):
    proc = cli("embed", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o"), "--dry-run")
    assert_one_line_error(proc, 2, "no such file or directory")


def test_many_shards_are_sampled_and_scaled_by_size(tmp_path, monkeypatch):
    from pipeline.commands import dryrun

    monkeypatch.setattr(dryrun, "MAX_COUNTED_SHARDS", 4)
    for k in range(12):
        (tmp_path / f"s{k:02d}.txt").write_text("x" * 9 + "\n" + "y" * 9 + "\n" * (k % 2))  # 2 documents of 10 bytes
    counts = dryrun.count_all(discover_shards(str(tmp_path)))
    methods = [c.method for c in counts]
    assert methods.count("counted") == 4 and methods.count("estimated from other shards") == 8
    assert all(c.documents == 2 for c in counts)
