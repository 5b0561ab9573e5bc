"""core.fde: the MUVERA encodings against a plain per-token reading of the reference, and
how their inner products track exact Chamfer similarity."""
import numpy as np
import pytest

from vecpipe.core.fde import Fde, FdeConfig, chamfer, chamfer_scores, pack_sets
from vecpipe.formats.errors import DataError, UsageError


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_fde(fde: Fde, points: np.ndarray, side: str) -> np.ndarray:
    """google/graph-mining's loops, written out point by point (bucket = bits as binary)."""
    c = fde.config
    out = []
    for r in range(c.reps):
        planes = fde._hyperplanes[r]
        if fde._projections is None:
            proj = points.copy()
        else:
            index, sign, cols = fde._projections[r]
            matrix = np.zeros((c.token_dim, cols), np.float32)
            matrix[np.arange(c.token_dim), index] = sign
            proj = points @ matrix
        block = np.zeros((c.buckets, c.bucket_dim), np.float32)
        sizes = np.zeros(c.buckets)
        bits = (points @ planes > 0).astype(int)
        for i, row in enumerate(bits):
            b = int("".join(map(str, row)), 2) if c.simhash else 0
            block[b] += proj[i]
            sizes[b] += 1
        if side == "document":
            for b in range(c.buckets):
                if sizes[b]:
                    block[b] /= sizes[b]
                elif c.fill_empty and c.simhash:
                    want = np.array([(b >> (c.simhash - 1 - k)) & 1 for k in range(c.simhash)])
                    dist = (bits != want).sum(axis=1)
                    block[b] = proj[int(np.argmin(dist))]
        out.append(block.ravel())
    flat = np.concatenate(out)
    if fde._final is not None:
        index, sign, cols = fde._final
        final = np.zeros(cols, np.float32)
        np.add.at(final, index, sign * flat)
        flat = final
    return flat


@pytest.mark.parametrize("options", [dict(reps=3, simhash=3), dict(reps=2, simhash=0),
                                     dict(reps=2, simhash=4, proj_dim=5),
                                     dict(reps=4, simhash=2, proj_dim=3, final_dim=17),
                                     dict(reps=2, simhash=3, fill_empty=False)])
@pytest.mark.parametrize("side", ["document", "query"])
def test_encode_matches_the_reference_loops(options, side):
    rng = np.random.default_rng(0)
    sets = [unit(rng, n, 12) for n in (1, 7, 3, 20)] + [np.zeros((0, 12), np.float32)] \
        + [unit(rng, 2, 12)]
    fde = Fde(FdeConfig(token_dim=12, seed=7, **options))
    tokens, offsets = pack_sets(sets)
    got = fde.encode(tokens, offsets, side)
    assert got.shape == (len(sets), fde.config.out_dim) and got.dtype == np.float32
    for row, points in enumerate(sets):
        want = naive_fde(fde, points, side) if len(points) else np.zeros(fde.config.out_dim)
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-6)


def test_single_token_document_gives_reps_times_chamfer():
    """Every bucket of a one-token document holds that token (filled), so each repetition's
    inner product is exactly sum_q <q, d>."""
    rng = np.random.default_rng(1)
    query, doc = unit(rng, 6, 16), unit(rng, 1, 16)
    fde = Fde(FdeConfig(token_dim=16, reps=5, simhash=3))
    q = fde.encode(*pack_sets([query]), "query")[0]
    d = fde.encode(*pack_sets([doc]), "document")[0]
    assert q @ d == pytest.approx(5 * chamfer(query, doc), rel=1e-5)


def test_seed_reproduces_and_changes():
    rng = np.random.default_rng(2)
    tokens, offsets = pack_sets([unit(rng, 9, 8), unit(rng, 4, 8)])
    config = FdeConfig(token_dim=8, reps=3, simhash=2, proj_dim=4, final_dim=20, seed=3)
    a = Fde(config).encode(tokens, offsets)
    b = Fde(FdeConfig.from_json(config.to_json())).encode(tokens, offsets)
    np.testing.assert_array_equal(a, b)
    other = Fde(FdeConfig(token_dim=8, reps=3, simhash=2, proj_dim=4, final_dim=20, seed=4))
    assert not np.allclose(a, other.encode(tokens, offsets))


def test_chamfer_scores_equal_brute_force():
    rng = np.random.default_rng(3)
    query = unit(rng, 5, 10)
    sets = [unit(rng, n, 10) for n in (3, 1, 8)] + [np.zeros((0, 10), np.float32)] \
        + [unit(rng, 4, 10)]
    tokens, offsets = pack_sets(sets)
    want = [sum(max(float(q @ d) for d in s) for q in query) if len(s) else 0.0
            for s in sets]
    np.testing.assert_allclose(chamfer_scores(query, tokens, offsets), want, rtol=1e-5)
    assert chamfer(query, sets[0]) == pytest.approx(want[0], rel=1e-5)


def _token_sets(seed=0, dim=16, docs=100, tokens=8):
    """Random unit token sets, and queries made of noisy copies of 4 tokens of every 5th set."""
    rng = np.random.default_rng(seed)
    sets = [unit(rng, tokens, dim) for _ in range(docs)]
    queries = []
    for i in range(0, docs, 5):
        q = sets[i][:4] + 0.2 * unit(rng, 4, dim)
        queries.append(q / np.linalg.norm(q, axis=1, keepdims=True))
    return sets, queries


def _compare(docs, queries, reps, simhash):
    """(recall@10 of the FDE ranking against the exact Chamfer ranking, per query-token error
    of the FDE estimate for every document, the same for each query's source document)."""
    fde = Fde(FdeConfig(token_dim=docs[0].shape[1], reps=reps, simhash=simhash, seed=11))
    doc_tokens, doc_offsets = pack_sets(docs)
    d = fde.encode(doc_tokens, doc_offsets, "document")
    q = fde.encode(*pack_sets(queries), "query")
    recalls, errors, source_errors = [], [], []
    for j, (query, q_fde) in enumerate(zip(queries, q)):
        exact = chamfer_scores(query, doc_tokens, doc_offsets)
        approx = d @ q_fde / reps
        recalls.append(len(set(np.argsort(-exact)[:10]) & set(np.argsort(-approx)[:10])) / 10)
        errors.append(np.abs(approx - exact).mean() / len(query))
        source_errors.append(abs(approx[5 * j] - exact[5 * j]) / len(query))
    return float(np.mean(recalls)), float(np.mean(errors)), float(np.max(source_errors))


def test_fde_ranking_tracks_chamfer_better_with_more_repetitions():
    docs, queries = _token_sets()
    one = _compare(docs, queries, reps=1, simhash=4)
    many = _compare(docs, queries, reps=32, simhash=4)
    assert many[0] >= one[0] + 0.1


def test_unprojected_fde_is_within_the_error_bound():
    """Theorem 2.1: with enough hyperplanes and repetitions the normalised FDE inner product
    <F_q(Q), F_d(D)> / (R |Q|) is within eps of the normalised Chamfer similarity; the error
    shrinks as K grows (measured: 0.54, 0.26, 0.07, 0.03 at K = 2, 4, 8, 10 for the documents
    the queries came from)."""
    docs, queries = _token_sets()
    errors = [_compare(docs, queries, reps=32, simhash=k) for k in (2, 4, 8, 10)]
    worst = [e[2] for e in errors]
    assert worst == sorted(worst, reverse=True)
    assert worst[-1] < 0.1
    assert errors[-1][1] < errors[0][1]  # over every document too


def test_config_is_checked():
    with pytest.raises(UsageError):
        FdeConfig(token_dim=8, reps=0)
    with pytest.raises(UsageError):
        FdeConfig(token_dim=8, simhash=30)
    with pytest.raises(DataError):
        FdeConfig.from_json('{"format": 9}')
    fde = Fde(FdeConfig(token_dim=8, reps=1, simhash=1))
    with pytest.raises(DataError, match="8"):
        fde.encode(np.zeros((3, 5), np.float32), np.array([0, 3]))
