"""The vector space value, its one comparison, and the shared batch helpers under it."""
import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.space import (SpaceMismatch, VectorSpace, check_model, check_same_space,
                                role_prompt)
from vecpipe.formats import schema as names
from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.readers import SourceBatch, check_one_stdin


def test_space_round_trips_through_metadata_and_names_the_difference():
    meta = {"model": "m", "model_sha": "abc", "dim": "384", "normalized": "true", "version": "1"}
    space = VectorSpace.from_meta(meta)
    assert space.meta() == {key: value for key, value in meta.items() if key != "version"}
    other = VectorSpace.from_meta(dict(meta, dim="128"))
    assert space.difference(other, "a", "b") == "dim differs: a has '384', b has '128'"
    assert space.difference(VectorSpace(model="m"), "a", "b") is None  # missing keys agree
    with pytest.raises(SpaceMismatch, match="model differs"):
        check_same_space(meta, {"model": "n"}, "a", "b")
    check_same_space(meta, {"model": "n"}, "a", "b", force=True)


def test_truncation_compares_equal_however_it_was_fitted():
    from vecpipe.core.codec import Codec

    rng = np.random.default_rng(0)
    small, large = rng.normal(size=(20, 16)), rng.normal(size=(200, 16))
    a, b = Codec.fit(small, "float16", dim=8), Codec.fit(large, "float16", dim=8)
    check_same_space(a.metadata(), b.metadata(), "a", "b")


class _Model:
    name, sha, dim = "m", None, 8
    prompts = {"query": "q: ", "passage": "p: "}

    def prompt_text(self, prompt, prompt_name):
        return self.prompts[prompt_name] if prompt_name else prompt or ""


def test_model_check_and_role_prompts():
    check_model({"model": "m"}, _Model(), "idx", "m", dim=8)
    with pytest.raises(DataError, match="makes 8-dimensional vectors, the vectors have 4"):
        check_model({"model": "m"}, _Model(), "idx", "m", dim=4)
    with pytest.raises(SpaceMismatch, match="model differs: idx has 'x', -m m has 'm'"):
        check_model({"model": "x"}, _Model(), "idx", "m")
    model = _Model()
    assert role_prompt(model, "query") == "q: "
    assert role_prompt(model, "doc") == "p: "
    assert role_prompt(model, "query", recorded="r: ") == "r: "
    assert role_prompt(model, "query", "given", recorded="r: ") == "given"
    assert role_prompt(model, "doc", prompt_name="query") == "q: "


def test_checked_vectors_locate_nulls_and_nan():
    vectors = pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32()))
    item = SourceBatch(pa.record_batch({"embedding": vectors}), "f.arrow", 10)
    with pytest.raises(DataError) as err:
        names.checked_vectors(item)
    assert (err.value.source, err.value.record) == ("f.arrow", 11)
    nan = pa.array([[1.0, 2.0], [float("nan"), 0.0]], pa.list_(pa.float32()))
    item = SourceBatch(pa.record_batch({"embedding": nan}), "f.arrow", 10)
    with pytest.raises(DataError, match="query vector holds NaN") as err:
        names.checked_vectors(item, nonfinite="query vector")
    assert err.value.record == 11
    assert names.checked_vectors(item, nonfinite=None).shape == (2, 2)


def test_batch_ids_null_policies():
    batch = pa.record_batch({"id": pa.array([1, None, 3])})
    assert names.batch_ids(batch, None, 5).to_pylist() == ["5", "6", "7"]
    assert names.batch_ids(batch, "id", 5, on_null="record").to_pylist() == ["1", "6", "3"]
    assert names.batch_ids(batch, "id", 5, on_null="keep").to_pylist() == ["1", None, "3"]
    with pytest.raises(DataError, match="record has no id") as err:
        names.batch_ids(batch, "id", 5, source="f")
    assert (err.value.source, err.value.record) == ("f", 6)


def test_stdin_is_read_once():
    check_one_stdin(["-", "a"])
    with pytest.raises(UsageError, match="stdin"):
        check_one_stdin(["-", "a", "-"])
