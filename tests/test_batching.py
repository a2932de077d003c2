"""The host work both encoders share (pipeline.stages.batching), on tiny hand-checked inputs,
and the out-of-memory split through EncodeStage and CrossEncodeStage."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.stages.batching import (
    compute_dtype, micro_batches, pad_features, padding, plan_micro_batches, split_on_oom, to_device,
)


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


# --------------------------------------------------------------------------- planning


def test_plan_keeps_every_micro_batch_within_the_budget_once_padded_to_its_first_row():
    # budget 30: [10, 10, 8] pads to 10 -> 30 tokens; a fourth row would make 40. [5, 5, 5, 2] pads to 5 -> 20.
    assert plan_micro_batches(np.array([10, 10, 8, 5, 5, 5, 2]), 30) == [(0, 3), (3, 7)]
    # exactly on the budget: 3 rows of 4 = 12; the fourth row starts the next micro-batch
    assert plan_micro_batches(np.array([4, 4, 4, 4]), 12) == [(0, 3), (3, 4)]


def test_plan_gives_a_row_longer_than_the_budget_its_own_micro_batch_and_counts_empty_rows_as_one_token():
    assert plan_micro_batches(np.array([100, 3, 3]), 10) == [(0, 1), (1, 3)]
    assert plan_micro_batches(np.array([0, 0, 0]), 2) == [(0, 2), (2, 3)]  # never a zero-row slice
    assert plan_micro_batches(np.array([], np.int64), 10) == []


def padded_cost(lengths: np.ndarray, spans, call: int) -> int:
    return sum((e - s) * max(int(lengths[s]), 1) + call for s, e in spans)


def test_least_padding_cuts_where_the_length_drops_when_a_call_costs_less_than_the_padding():
    lengths = np.array([10, 10, 8, 5, 5, 5, 2])
    # budget-filling: [10,10,8] pads 2, [5,5,5,2] pads 3. At 1 token a call, cutting off the 8 and the 2 pays.
    assert plan_micro_batches(lengths, 30, call_tokens=1) == [(0, 2), (2, 3), (3, 6), (6, 7)]
    assert plan_micro_batches(lengths, 30, call_tokens=0)[-1] == (6, 7)  # no padding at all
    assert plan_micro_batches(lengths, 30, call_tokens=100) == plan_micro_batches(lengths, 30)  # calls dear: fill
    assert plan_micro_batches(np.array([100, 3, 3]), 10, call_tokens=5) == [(0, 1), (1, 3)]  # too long: alone
    assert plan_micro_batches(np.array([0, 0, 0]), 2, call_tokens=0) == [(0, 2), (2, 3)]
    assert plan_micro_batches(np.array([], np.int64), 10, call_tokens=5) == []


@pytest.mark.parametrize("call", [0, 3, 12, 64, 4096])
def test_least_padding_covers_every_row_within_the_budget_and_never_costs_more_than_filling(call):
    rng = np.random.default_rng(call)
    for _ in range(40):
        n, budget = int(rng.integers(1, 600)), int(rng.choice([16, 200, 2048, 16384]))
        lengths = np.sort(np.minimum(rng.geometric(0.08, n), 300))[::-1]
        spans = plan_micro_batches(lengths, budget, call_tokens=call)
        assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]] and spans[-1][1] == n
        assert all(e > s and ((e - s) * max(int(lengths[s]), 1) <= budget or e - s == 1) for s, e in spans)
        filled = plan_micro_batches(lengths, budget)
        assert padded_cost(lengths, spans, call) <= padded_cost(lengths, filled, call)


def test_micro_batches_yield_the_rows_themselves_in_their_order():
    lengths = np.array([2, 9, 5, 9])  # indexed by row
    rows = np.array([1, 3, 2, 0])  # longest first
    # budget 18: rows 1, 3 pad to 9 -> 18; rows 2, 0 pad to 5 -> 10
    assert [b.tolist() for b in micro_batches(rows, lengths, 18)] == [[1, 3], [2, 0]]


# --------------------------------------------------------------------------- padding


def test_padding_follows_the_tokenizer_side_and_pad_ids():
    bert = SimpleNamespace(pad_token_id=0, padding_side="right", pad_token_type_id=0)
    assert padding(bert) == (False, {"input_ids": 0, "token_type_ids": 0})
    decoder = SimpleNamespace(pad_token_id=None, eos_token_id=2, padding_side="left")  # no pad token: eos pads
    assert padding(decoder) == (True, {"input_ids": 2, "token_type_ids": 0})


def test_right_padding_of_rows_given_flat_or_one_array_each():
    rows = [np.array([101, 7, 102]), np.array([101, 102]), np.array([101, 8, 9, 102])]
    lengths = np.array([3, 2, 4])
    expected_ids = np.array([
        [101, 7, 102, 0],
        [101, 102, 0, 0],
        [101, 8, 9, 102],
    ])
    expected_mask = np.array([
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ])
    for tokens in (rows, np.concatenate(rows).astype(np.int32)):
        features = pad_features({"input_ids": tokens}, lengths, left=False, pad_values={"input_ids": 0})
        assert set(features) == {"input_ids", "attention_mask"}
        assert features["input_ids"].dtype == features["attention_mask"].dtype == np.int64
        np.testing.assert_array_equal(features["input_ids"], expected_ids)
        np.testing.assert_array_equal(features["attention_mask"], expected_mask)


def test_left_padding_with_the_pad_id_and_zero_for_a_feature_without_one():
    rows = {
        "input_ids": [np.array([5, 6]), np.array([7, 8, 9])],
        "token_type_ids": [np.array([1, 1]), np.array([1, 1, 1])],
    }
    features = pad_features(rows, np.array([2, 3]), left=True, pad_values={"input_ids": 2})
    np.testing.assert_array_equal(features["input_ids"], [[2, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(features["token_type_ids"], [[0, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(features["attention_mask"], [[0, 1, 1], [1, 1, 1]])


# --------------------------------------------------------------------------- device and dtype


def test_compute_dtype_auto_is_float16_on_cuda_and_float32_on_cpu():
    assert compute_dtype("auto", "cuda") == "float16"
    assert compute_dtype("auto", "cpu") == "float32"
    assert compute_dtype("bfloat16", "cpu") == "bfloat16"
    assert compute_dtype("float32", "cuda") == "float32"


def test_to_device_copies_a_read_only_view_of_an_arrow_buffer_once_on_cpu():
    import pyarrow as pa

    view = np.asarray(pa.array(np.arange(6, dtype=np.int64))).reshape(2, 3)  # read-only, as a ready micro-batch
    assert not view.flags.writeable
    tensor = to_device(view, torch.device("cpu"))
    assert tensor.dtype == torch.int64 and tensor.tolist() == [[0, 1, 2], [3, 4, 5]]
    tensor += 1  # its own memory: the Arrow buffer is untouched
    assert view.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_an_encoder_given_a_gpu_torch_cannot_see_falls_back_only_under_device_auto(monkeypatch):
    import torch

    from pipeline.stages.encode import usable_device
    from pipeline.errors import PipelineError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert usable_device("cuda", "auto") == "cpu"
    assert usable_device("cpu", "auto") == "cpu"
    with pytest.raises(PipelineError, match="--device cuda: Ray gave this encoder a GPU, but torch"):
        usable_device("cuda", "cuda")


# --------------------------------------------------------------------------- out-of-memory split


def test_an_out_of_memory_micro_batch_is_halved_until_it_fits_and_joined_in_order():
    rows = np.array([4, 0, 3, 1, 2])
    lengths = np.array([1, 2, 3, 4, 5])
    calls = []

    def forward(part):  # (B,) "vectors": each row's number times ten; more than 2 rows "run out of memory"
        calls.append(part.tolist())
        if len(part) > 2:
            raise oom()
        return part * 10

    got = split_on_oom(forward, rows, lengths, np.concatenate)
    np.testing.assert_array_equal(got, rows * 10)  # as unsplit, in the rows' order
    # 5 -> 2 + 3; the 3 -> 1 + 2
    assert calls == [[4, 0, 3, 1, 2], [4, 0], [3, 1, 2], [3], [1, 2]]


def test_a_single_row_that_does_not_fit_raises_and_a_batch_that_fits_runs_once():
    def never_fits(part):
        raise oom()

    with pytest.raises(torch.cuda.OutOfMemoryError):
        split_on_oom(never_fits, np.array([0, 1, 2]), np.array([1, 1, 1]), np.concatenate)
    calls = []

    def fits(part):
        calls.append(part)
        return part

    assert split_on_oom(fits, np.array([3, 4]), np.zeros(5), np.concatenate).tolist() == [3, 4]
    assert len(calls) == 1


def test_encode_stage_splits_out_of_memory_micro_batches_into_the_unsplit_vectors(tiny_bert_dir, tmp_path, monkeypatch):
    from pipeline.config import EmbedConfig
    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage
    from tests.conftest import make_st_dir

    model = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean")
    config = EmbedConfig(input="x", output="y", model=model, max_batch_tokens=400)
    texts = [f"row {i} " + "word " * (i % 11) for i in range(40)]
    batch = pa.table({"id": [str(i) for i in range(40)], "text": texts, "_valid": [True] * 40})
    tokens = TokenizeStage(config)(batch)
    stage = EncodeStage(config, "cpu", 1)
    unsplit = stage(tokens)

    real_run, sizes = stage._run, []

    def run_or_oom(features):
        sizes.append(features["input_ids"].shape[0])
        if sizes[-1] > 3:
            raise oom()
        return real_run(features)

    monkeypatch.setattr(stage, "_run", run_or_oom)
    split = stage(tokens)
    assert max(sizes) > 3 and max(s for s in sizes if s <= 3) > 1  # it ran out of memory, then split
    assert split["id"].to_pylist() == unsplit["id"].to_pylist()
    got = split["embedding"].combine_chunks().flatten().to_numpy()
    want = unsplit["embedding"].combine_chunks().flatten().to_numpy()
    assert np.abs(got - want).max() < 1e-5  # halves keep their micro-batch's width: float noise only


def test_cross_encode_stage_splits_out_of_memory_micro_batches_into_the_unsplit_scores(cross_encoder_dir, monkeypatch):
    from pipeline.config import RerankConfig
    from pipeline.stages.cross_encode import CrossEncodeStage
    from tests.conftest import sample_texts

    texts = sample_texts()
    rng = np.random.default_rng(0)
    pairs = [(texts[i], texts[j]) for i, j in rng.integers(0, len(texts), (60, 2))]
    batch = pa.table({"pair": np.arange(60), "text_a": [a for a, _ in pairs], "text_b": [b for _, b in pairs]})
    config = RerankConfig(pairs="p", texts="t", model=cross_encoder_dir, output="o", max_batch_tokens=600)
    stage = CrossEncodeStage(config, "cpu", 1)
    unsplit = stage(batch)

    real_forward, sizes = stage.model.forward, []

    def forward_or_oom(features):
        sizes.append(features["input_ids"].shape[0])
        if sizes[-1] > 3:
            raise oom()
        return real_forward(features)

    monkeypatch.setattr(stage.model, "forward", forward_or_oom)
    split = stage(batch)
    assert max(sizes) > 3 and max(s for s in sizes if s <= 3) > 1  # it ran out of memory, then split
    assert split["pair"].to_pylist() == list(range(60))
    assert split["n_tokens"].to_pylist() == unsplit["n_tokens"].to_pylist()
    assert np.abs(split["rerank_score"].to_numpy() - unsplit["rerank_score"].to_numpy()).max() < 1e-5
