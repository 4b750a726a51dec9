"""The corpus store: atomic shard sets, manifest, exact mix selection, two views."""
import json

import numpy as np
import pyarrow as pa
import pytest

from engine import strategies as S
from engine.corpus import CorpusError, CorpusStore


def table(n, offset=0):
    return pa.table({"v": pa.array(np.arange(offset, offset + n))})


@pytest.fixture
def store(tmp_path):
    s = CorpusStore(tmp_path / "corpus")
    s.write(S.real(1), table(10, 0), model="real data")
    s.write(S.synthetic(1), table(10, 100), model="generation 1 (m)", temperature=1.0)
    s.write(S.synthetic(2), table(20, 200), model="generation 2 (m)", temperature=1.0)
    return s


def test_manifest_records_rows_checksums_model_and_temperature(store):
    entry = store.entry(S.synthetic(2))
    assert entry.rows == 20 and entry.model == "generation 2 (m)" and entry.temperature == 1.0
    assert len(entry.files) == 1 and len(entry.files[0].sha256) == 64
    assert store.verify() == []


def test_verify_finds_a_corrupted_shard(store):
    path = (store.root / store.entry(S.real(1)).files[0].path).local_path
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    assert any("checksum mismatch" in p for p in store.verify())


def test_a_corpus_is_never_overwritten(store):
    with pytest.raises(CorpusError, match="already exists"):
        store.write(S.synthetic(1), table(10), model="x")


def test_no_temp_files_are_left_behind(store):
    assert not [p for p in store.root.local_path.rglob(".tmp-*")]
    assert json.loads(store.manifest_path.read_text()).keys() == {
        "real-0001", "synthetic-0001", "synthetic-0002"}


def test_mix_all_reads_every_part_in_order(store):
    mix = S.get("accumulate").mix(3, 10)
    assert store.read(mix, seed=0).column("v").to_pylist() == (
        list(range(10)) + list(range(100, 110)) + list(range(200, 210)))


def test_replace_multiple_reads_the_first_rows_of_a_larger_corpus(store):
    mix = S.get("replace_multiple").mix(2, 10)  # 20 rows of synthetic-0001: too many
    with pytest.raises(CorpusError, match="needs 20 rows of synthetic-0001, the store has 10"):
        store.read(mix, seed=0)
    mix = S.get("replace_multiple").mix(3, 10)  # 30 rows of synthetic-0002: it has 20
    with pytest.raises(CorpusError):
        store.read(mix, seed=0)


def test_subsample_draws_exactly_without_replacement_and_deterministically(store):
    mix = S.get("subsample").mix(3, 10)
    a = store.read(mix, seed=5).column("v").to_pylist()
    assert len(a) == 10 and len(set(a)) == 10
    assert set(a) <= set(range(10)) | set(range(100, 110)) | set(range(200, 210))
    assert store.read(mix, seed=5).column("v").to_pylist() == a
    assert store.read(mix, seed=6).column("v").to_pylist() != a


def test_subsample_with_replacement_can_repeat_rows(store):
    mix = S.Mix(tuple(S.get("accumulate").mix(3, 10).parts), "with_replacement", 30)
    rows = store.read(mix, seed=1).column("v").to_pylist()
    assert len(rows) == 30 and len(set(rows)) < 30  # P(no repeat) = 30!/30^30 ≈ 1e-12


@pytest.mark.slow
def test_ray_dataset_view_serves_exactly_the_same_rows(store, ray_local):
    """... and it streams where the chains and their actors hold all but a fraction of
    a CPU (ray.data.read_parquet hangs there: its file listing asks for a whole CPU)."""
    import ray

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    free = ray.available_resources()["CPU"]
    holder = Holder.options(num_cpus=free - 0.1).remote()  # 0.1 CPU left free
    ray.get(holder.ready.remote())
    try:
        for name in ("accumulate", "subsample", "subsample_with_replacement"):
            mix = S.get(name).mix(3, 10)
            in_memory = sorted(store.read(mix, seed=3).column("v").to_pylist())
            streamed = sorted(r["v"] for r in store.dataset(mix, seed=3).iter_rows())
            assert streamed == in_memory, name
            shuffled = [r["v"] for r in store.dataset(mix, seed=3, shuffle_files=True)
                        .iter_rows()]
            assert sorted(shuffled) == in_memory, name
    finally:
        ray.kill(holder)


def test_a_mix_of_corpora_with_different_columns_keeps_the_common_ones(tmp_path):
    # a chain directory named like a Hive partition must not add a column either
    s = CorpusStore(tmp_path / "accumulate__seed=0" / "corpus")
    s.write(S.real(1), pa.table({"v": [1, 2], "true_logprob": [-1.0, -2.0]}), model="real data")
    s.write(S.synthetic(1), pa.table({"v": [3, 4], "logprob": [-0.5, -0.1]}), model="g1")
    table = s.read(S.get("accumulate").mix(2, 2), seed=0)
    assert table.column_names == ["v"] and table.column("v").to_pylist() == [1, 2, 3, 4]


def test_files_shuffled_across_parts_stream_in_a_seeded_order(tmp_path, ray_local):
    """The order a fit streams the mix in: files of every part interleaved, drawn from
    the seed, each file its own block (no all-to-all pass before the first batch)."""
    from engine import corpus

    s = CorpusStore(tmp_path / "corpus")
    old = corpus.ROWS_PER_FILE
    corpus.ROWS_PER_FILE = 5  # several files per corpus
    try:
        s.write(S.real(1), table(20, 0), model="real data")
        s.write(S.synthetic(1), table(20, 100), model="g1")
    finally:
        corpus.ROWS_PER_FILE = old
    mix = S.get("accumulate").mix(2, 20)
    runs = [[r["v"] for r in s.dataset(mix, seed=k, shuffle_files=True).iter_rows()]
            for k in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]  # seeded
    assert sorted(runs[0]) == list(range(20)) + list(range(100, 120))
    firsts = [v // 100 for v in runs[0][::5]]  # one file's first row each: 0 real, 1 synthetic
    assert firsts != sorted(firsts)  # the parts' files interleave


def test_mix_size_counts_from_the_manifest_and_the_column(store, tmp_path):
    s = CorpusStore(tmp_path / "counted")
    s.write(S.real(1), pa.table({"n_tokens": pa.array(np.arange(10))}), model="real data")
    s.write(S.synthetic(1), pa.table({"n_tokens": pa.array(np.arange(10) * 3)}), model="g1")
    assert s.entry(S.real(1)).files[0].sums == {"n_tokens": 45}
    for name, seed in (("accumulate", 0), ("subsample", 4), ("subsample_with_replacement", 2)):
        mix = S.get(name).mix(2, 10)
        read = s.read(mix, seed).column("n_tokens").to_numpy()
        assert s.mix_size(mix, seed, "n_tokens") == (int(read.sum()), len(read)), name
