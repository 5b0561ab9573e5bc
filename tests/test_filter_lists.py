"""The filter language on list fields (`contains`, `any in`, `all in`, nulls in and of lists)
against a plain-python reference over random data, and end to end: a filtered exact search of
an index and of an embeddings stream holding a list field equals numpy brute force."""
import numpy as np
import orjson
import pyarrow as pa
import pytest

from vecpipe.core.filter_expr import parse
from vecpipe.formats.errors import DataError, UsageError

WORDS = ["a", "b", "c", "d"]


def random_lists(rng, rows, values):
    """Lists of 0-4 elements drawn from `values` plus null elements; some lists null."""
    out = []
    for _ in range(rows):
        if rng.random() < 0.15:
            out.append(None)
            continue
        out.append([None if rng.random() < 0.1 else values[rng.integers(len(values))]
                    for _ in range(rng.integers(0, 5))])
    return out


# The reference: three-valued like the language (None = null, which no test or `not` keeps).
def contains(lists, item):
    return None if lists is None else item in lists


def any_in(lists, items):
    return None if lists is None else any(element in items for element in lists)


def all_in(lists, items):
    return None if lists is None else all(element in items for element in lists)


def negated(value):
    return None if value is None else not value


def both(left, right):  # SQL `and`
    if left is False or right is False:
        return False
    return None if left is None or right is None else True


CASES = [  # expression, reference(row) -> True/False/None
    ('tags contains "a"', lambda r: contains(r["tags"], "a")),
    ("tags contains null", lambda r: contains(r["tags"], None)),
    ('tags any in ["b", "c"]', lambda r: any_in(r["tags"], ["b", "c"])),
    ('tags all in ["a", "b"]', lambda r: all_in(r["tags"], ["a", "b"])),
    ('tags all in ["a", "b", null]', lambda r: all_in(r["tags"], ["a", "b", None])),
    ('tags any in ["d", null]', lambda r: any_in(r["tags"], ["d", None])),
    ("tags any in []", lambda r: any_in(r["tags"], [])),
    ("tags all in []", lambda r: all_in(r["tags"], [])),  # the emptiness test
    ('not tags contains "a"', lambda r: negated(contains(r["tags"], "a"))),
    ('not (tags all in ["a"])', lambda r: negated(all_in(r["tags"], ["a"]))),
    ("tags is null", lambda r: r["tags"] is None),
    ("tags is not null and nums is null", lambda r: r["tags"] is not None and r["nums"] is None),
    ("nums contains 3", lambda r: contains(r["nums"], 3)),
    ("nums any in [1, 2.0]", lambda r: any_in(r["nums"], [1, 2])),
    ("nums all in [0, 1, 2, 3]", lambda r: all_in(r["nums"], [0, 1, 2, 3])),
    ("nums contains null", lambda r: contains(r["nums"], None)),
    ('tags contains "a" and nums contains 1',
     lambda r: both(contains(r["tags"], "a"), contains(r["nums"], 1))),
    ('TAGS_UPPER ALL IN ["A"]', lambda r: all_in(r["TAGS_UPPER"], ["A"])),
    ('`all` contains "b"', lambda r: contains(r["all"], "b")),
    ("contains any in [1]", lambda r: any_in(r["contains"], [1])),  # words, not keywords here
]


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(17)
    rows = 500
    tags = random_lists(rng, rows, WORDS)
    return {"tags": tags, "nums": random_lists(rng, rows, [0, 1, 2, 3, 4]),
            "TAGS_UPPER": [None if t is None else [None if e is None else e.upper() for e in t]
                           for t in tags],
            "all": random_lists(rng, rows, WORDS), "contains": random_lists(rng, rows, [1, 2]),
            "year": rng.integers(2000, 2025, rows).tolist()}


def tables(records):
    """The same rows as one table, as a table of several chunks (sliced list arrays), as a
    large_list table and as a fixed_size_list one where the lists allow it."""
    table = pa.table(records)
    yield table
    yield pa.concat_tables([table.slice(0, 123), table.slice(123, 200), table.slice(323)])
    yield table.cast(pa.schema([pa.field(name, pa.large_list(field.type.value_type))
                                if pa.types.is_list(field.type) else field
                                for name, field in zip(table.column_names, table.schema)]))


@pytest.mark.parametrize("expression, reference", CASES, ids=[c[0] for c in CASES])
def test_list_tests_equal_a_python_reference(records, expression, reference):
    rows = [dict(zip(records, values)) for values in zip(*records.values())]
    expected = [reference(row) is True for row in rows]
    assert 0 < sum(expected) < len(rows) or "[]" in expression  # a test that can fail
    for table in tables(records):
        assert parse(expression).mask(table).tolist() == expected, table.schema
        batch = table.combine_chunks().to_batches()[0]
        assert parse(expression).mask(batch).tolist() == expected


def test_fixed_size_lists_and_all_null_and_all_empty_columns():
    fixed = pa.array([[1, 2], [3, None], None, [2, 2]], pa.list_(pa.int64(), 2))
    table = pa.table({"pair": fixed, "nothing": pa.nulls(4), "empty": [[], [], None, []]})
    assert parse("pair contains 2").mask(table).tolist() == [True, False, False, True]
    assert parse("pair all in [2]").mask(table).tolist() == [False, False, False, True]
    assert parse("pair contains null").mask(table).tolist() == [False, True, False, False]
    assert parse('nothing contains "x"').mask(table).tolist() == [False] * 4
    assert parse("empty all in []").mask(table).tolist() == [True, True, False, True]
    assert parse("empty any in [1]").mask(table).tolist() == [False] * 4


@pytest.mark.parametrize("expression, error, words", [
    ('tags contains ["a"]', UsageError, "position"),
    ("tags any [1]", UsageError, "expected in"),
    ("tags all in 1", UsageError, "expected ["),
    ('title contains "a"', DataError, "needs a list field"),
    ('"a" contains "a"', DataError, "needs a list field"),
    ('tags in ["a"]', DataError, "list<"),
    ('tags == "a"', DataError, "list<"),
    ("nums any in [1.5]", DataError, "cannot compare"),
])
def test_list_test_errors(expression, error, words):
    table = pa.table({"tags": [["a"], None], "nums": [[1], [2]], "title": ["x", "y"]})
    with pytest.raises(error) as caught:
        parse(expression).mask(table)
    assert words in str(caught.value)
    if "list<" in words:
        assert "any in" in caught.value.hint


def write_docs(path, vectors, tags):
    table = pa.table({"id": [f"d{i}" for i in range(len(vectors))], "tags": tags,
                      "embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array(vectors.reshape(-1)), vectors.shape[1])})
    table = table.replace_schema_metadata({b"vecpipe.model": b"fake:8",
                                           b"vecpipe.normalized": b"false"})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.mark.parametrize("expression", ['tags contains "a"', 'tags all in ["b", "c"]',
                                        'tags any in ["d"] and not tags contains null'])
def test_search_with_a_list_filter_equals_brute_force(cli, tmp_path, expression):
    rng = np.random.default_rng(3)
    docs = rng.standard_normal((400, 8)).astype(np.float32)
    tags = random_lists(rng, 400, WORDS)
    src = write_docs(tmp_path / "d.arrow", docs, tags)
    assert cli("index", src, "-o", tmp_path / "idx", "--all-fields").exit_code == 0
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    qfile = tmp_path / "q.jsonl"
    qfile.write_bytes(b"".join(orjson.dumps({"id": f"q{i}", "embedding": q.tolist()}) + b"\n"
                               for i, q in enumerate(queries)))
    mask = parse(expression).mask(pa.table({"tags": tags}))
    assert 10 < mask.sum() < 390
    unit = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    for target in (tmp_path / "idx", src):
        r = cli("search", target, qfile, "-k", 7, "--filter", expression, "--fields", "tags")
        assert r.exit_code == 0, r
        got = {}
        for record in r.records():
            got.setdefault(record["query_id"], []).append(int(record["id"][1:]))
        for i in range(5):
            expected = np.argsort(-np.where(mask, scores[i], -np.inf), kind="stable")[:7]
            assert got[f"q{i}"] == expected.tolist(), (target, i)
