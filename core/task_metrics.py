"""MTEB's task metrics on precomputed vectors: pair classification, reranking, bitext mining,
summarization, classification and clustering, each as MTEB 2's own evaluator computes it
(mteb/abstasks/*.py and mteb/_evaluators/*, checked in tests/test_eval_tasks.py).

Pure numpy for the deterministic ones; scikit-learn (the `eval` extra) only for the
classifier and the k-means of classification and clustering, imported where they run.
Conventions shared with MTEB:
- Similarities are computed in float64 from the vectors as given (no normalisation beyond
  what cosine does); distances (euclidean, manhattan) rank low-is-similar.
- Classification and clustering hand the vectors to scikit-learn in their own dtype (float32
  from a model), as MTEB does: scikit-learn's solvers keep float32, so an upcast would change
  the numbers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Sequence

from vecpipe.formats.errors import DataError, UsageError

if TYPE_CHECKING:
    import numpy as np

SKLEARN_HINT = "pip install 'vecpipe[eval]'"
PAIR_SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
PAIR_METRICS = ("accuracy", "f1", "precision", "recall", "ap")
RERANK_KS = (1, 3, 5, 10, 20, 100, 1000)  # MTEB's retrieval cutoffs


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UsageError("this evaluation needs scikit-learn, which is not installed",
                         hint=SKLEARN_HINT) from None


def _float64(x) -> "np.ndarray":
    import numpy as np

    return np.asarray(x, dtype=np.float64)


def _unit(x: "np.ndarray") -> "np.ndarray":
    """Rows scaled to norm 1; zero rows stay zero (sklearn's normalize, torch's clamp)."""
    import numpy as np

    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def cosine_matrix(a, b) -> "np.ndarray":
    """cos(a[i], b[j]) for every i, j (mteb.similarity_functions.cos_sim), float64."""
    return _unit(_float64(a)) @ _unit(_float64(b)).T


# ---------------------------------------------------------------- pair classification

def pair_similarities(a, b) -> dict[str, tuple["np.ndarray", bool]]:
    """name -> (per-pair scores, whether a higher score means more similar), as
    PairClassificationEvaluator: 1 - cosine distance, dot, euclidean and manhattan distance."""
    import numpy as np

    a, b = _float64(a), _float64(b)
    # sklearn's paired_cosine_distances, 0.5 |a/|a| - b/|b||^2 (a zero vector scores 0.5 or 1)
    return {"cosine": (1 - 0.5 * np.square(_unit(a) - _unit(b)).sum(axis=1), True),
            "dot": (np.einsum("ij,ij->i", a, b), True),
            "euclidean": (np.linalg.norm(a - b, axis=1), False),
            "manhattan": (np.abs(a - b).sum(axis=1), False)}


def _ordered(scores, labels, high_is_similar: bool):
    """(scores, labels) in MTEB's row order: sorted by score, most similar first (stable)."""
    rows = sorted(zip(scores.tolist(), labels.tolist()), key=lambda row: row[0],
                  reverse=high_is_similar)
    return [row[0] for row in rows], [row[1] for row in rows]


def best_accuracy(scores, labels, high_is_similar: bool = True) -> tuple[float, float]:
    """(accuracy, threshold) of the best threshold between two distinct scores, as
    AbsTaskPairClassification._find_best_acc_and_threshold (0, -1 when none beats 0)."""
    import numpy as np

    labels = np.asarray(labels)
    ordered, ordered_labels = _ordered(np.asarray(scores), labels, high_is_similar)
    best, threshold = 0.0, -1.0
    positives, remaining_negatives = 0, int(np.sum(labels == 0))
    for i in range(len(ordered) - 1):
        if ordered_labels[i] == 1:
            positives += 1
        else:
            remaining_negatives -= 1
        if ordered[i] == ordered[i + 1]:  # a threshold cannot split tied scores
            continue
        accuracy = (positives + remaining_negatives) / len(labels)
        if accuracy > best:
            best, threshold = accuracy, (ordered[i] + ordered[i + 1]) / 2
    return best, threshold


def best_f1(scores, labels, high_is_similar: bool = True) -> tuple[float, float, float, float]:
    """(f1, precision, recall, threshold) of the best-F1 threshold, as
    AbsTaskPairClassification._find_best_f1_and_threshold."""
    import numpy as np

    labels = np.asarray(labels)
    ordered, ordered_labels = _ordered(np.asarray(scores), labels, high_is_similar)
    best = best_precision = best_recall = threshold = 0.0
    correct, total = 0, int(np.sum(labels))
    for i in range(len(ordered) - 1):
        if ordered_labels[i] == 1:
            correct += 1
        if ordered[i] == ordered[i + 1]:
            continue
        if correct > 0:
            precision, recall = correct / (i + 1), correct / total
            f1 = 2 * precision * recall / (precision + recall)
            if f1 > best:
                best, best_precision, best_recall = f1, precision, recall
                threshold = (ordered[i] + ordered[i + 1]) / 2
    return best, best_precision, best_recall, threshold


def average_precision(labels, scores) -> float:
    """Average precision of binary labels ranked by score, higher first, tied scores taken
    together (sklearn.metrics.average_precision_score): sum of (R_k - R_k-1) * P_k."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.float64)
    scores = _float64(scores)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tie group
    true_positives = np.cumsum(labels)[last]
    predicted = last + 1.0
    if true_positives[-1] <= 0:
        return 0.0
    precision = true_positives / predicted
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pair_classification(a, b, labels) -> dict[str, float]:
    """MTEB's pair-classification scores of the pairs (a[i], b[i]) with 0/1 labels: for every
    similarity its best-threshold accuracy, best F1 with its precision and recall, and average
    precision (keys cosine_accuracy... dot_ap, with the two thresholds), then max_<metric>
    over the similarities; MTEB's main score is max_ap."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.int64)
    out: dict[str, float] = {}
    for name, (scores, high_is_similar) in pair_similarities(a, b).items():
        accuracy, accuracy_threshold = best_accuracy(scores, labels, high_is_similar)
        f1, precision, recall, f1_threshold = best_f1(scores, labels, high_is_similar)
        ap = average_precision(labels, scores if high_is_similar else -scores)
        out.update({f"{name}_accuracy": float(accuracy), f"{name}_f1": float(f1),
                    f"{name}_precision": float(precision), f"{name}_recall": float(recall),
                    f"{name}_ap": ap, f"{name}_accuracy_threshold": float(accuracy_threshold),
                    f"{name}_f1_threshold": float(f1_threshold)})
    for metric in PAIR_METRICS:
        out[f"max_{metric}"] = max(out[f"{name}_{metric}"] for name in PAIR_SIMILARITIES)
    return out


# ---------------------------------------------------------------- reranking

def reranking(queries, positives: Sequence, negatives: Sequence,
              ks: Sequence[int] = RERANK_KS):
    """MTEB's reranking (AbsTaskReranking as a retrieval task over each query's candidates):
    each query's positives (relevance 1) and negatives (0) ranked by cosine to it, scored as
    pytrec_eval does (core.retrieval_metrics, MTEB's cutoffs) with MTEB's MRR@k. Queries
    without a positive or without a negative are left out, as MTEB filters them. Candidate
    ids follow MTEB's (apositive_.../negative_...), so tied scores order the same way.
    Returns (Evaluation, number of queries left out)."""
    import numpy as np

    from vecpipe.core import retrieval_metrics

    queries = _float64(queries)
    run, qrels, left_out = {}, {}, 0
    for i, (pos, neg) in enumerate(zip(positives, negatives)):
        if len(pos) == 0 or len(neg) == 0:
            left_out += 1
            continue
        qid = f"test_query{i - left_out}"
        ids = ([f"apositive_{qid}_{j:05d}" for j in range(len(pos))]
               + [f"negative_{qid}_{j:05d}" for j in range(len(neg))])
        candidates = np.concatenate([_float64(pos), _float64(neg)])
        scores = cosine_matrix(queries[i:i + 1], candidates)[0]
        run[qid] = dict(zip(ids, scores.tolist()))
        qrels[qid] = {doc: int(doc.startswith("apositive_")) for doc in ids}
    if not run:
        raise DataError("no query has both a positive and a negative candidate")
    return retrieval_metrics.evaluate(qrels, run, ks), left_out


# ---------------------------------------------------------------- bitext mining

def nearest_neighbours(a, b, chunk: int = 1024) -> "np.ndarray":
    """For each row of a, the row of b with the highest cosine (the first on ties)."""
    import numpy as np

    unit_b = _unit(_float64(b)).T
    a = _float64(a)
    out = np.empty(len(a), dtype=np.int64)
    for start in range(0, len(a), chunk):
        out[start:start + chunk] = np.argmax(_unit(a[start:start + chunk]) @ unit_b, axis=1)
    return out


def weighted_scores(truth, predicted) -> dict[str, float]:
    """Accuracy and support-weighted precision, recall and F1 over the labels (zero where a
    denominator is 0), as sklearn's *_score(average="weighted", zero_division=0)."""
    import numpy as np

    truth, predicted = np.asarray(truth), np.asarray(predicted)
    labels, inverse = np.unique(np.concatenate([truth, predicted]), return_inverse=True)
    t, p = inverse[:len(truth)], inverse[len(truth):]
    support = np.bincount(t, minlength=len(labels)).astype(np.float64)
    predicted_count = np.bincount(p, minlength=len(labels)).astype(np.float64)
    hits = np.bincount(t[t == p], minlength=len(labels)).astype(np.float64)

    def ratio(num, den):
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    weights = support / support.sum()
    return {"accuracy": float(np.mean(t == p)),
            "precision": float(np.sum(weights * ratio(hits, predicted_count))),
            "recall": float(np.sum(weights * ratio(hits, support))),
            "f1": float(np.sum(weights * ratio(2 * hits, predicted_count + support)))}


def bitext_mining(a, b) -> dict[str, float]:
    """MTEB's bitext mining: row i of a should find row i of b as its nearest neighbour by
    cosine; accuracy and weighted precision, recall, F1 (main score: f1)."""
    return weighted_scores(range(len(a)), nearest_neighbours(a, b))


# ---------------------------------------------------------------- summarization

def summarization(machine: Sequence, human: Sequence, gold: Sequence) -> tuple[dict, int]:
    """MTEB's SummarizationEvaluator: each machine summary scores as its highest cosine (and
    dot) to the text's human summaries; per text, Spearman and Pearson of those scores with the
    gold ones, then the mean over texts. A text whose gold scores, or cosine or dot scores,
    are all equal is left out (as MTEB). Returns (scores, texts left out)."""
    import numpy as np

    from vecpipe.core.vector_stats import pearson, spearman

    correlations: dict[str, list[float]] = {key: [] for key in (
        "cosine_spearman", "cosine_pearson", "dot_spearman", "dot_pearson")}
    left_out = 0
    for machine_vectors, human_vectors, scores in zip(machine, human, gold):
        m, h = _float64(machine_vectors), _float64(human_vectors)
        cosine = cosine_matrix(m, h).max(axis=1).tolist()
        dot = (m @ h.T).max(axis=1).tolist()
        scores = [float(s) for s in scores]
        if len(set(scores)) == 1 or len(set(dot)) == 1 or len(set(cosine)) == 1:
            left_out += 1
            continue
        for name, predicted in (("cosine", cosine), ("dot", dot)):
            correlations[f"{name}_spearman"].append(spearman(scores, predicted))
            correlations[f"{name}_pearson"].append(pearson(scores, predicted))
    if not correlations["cosine_spearman"]:
        raise DataError("every text has equal gold or predicted scores: nothing to correlate")
    return {key: float(np.mean(values)) for key, values in correlations.items()}, left_out


# ---------------------------------------------------------------- classification

def undersample(labels: Sequence[Hashable], samples_per_label: int, experiments: int,
                seed: int) -> list[list[int]]:
    """The training rows of each experiment, as AbsTaskClassification._undersample_data: the
    row order is shuffled again (RandomState(seed)) for every experiment, starting from the
    previous order, and the first samples_per_label rows of each label are taken."""
    import numpy as np

    order = list(range(len(labels)))
    chosen = []
    for _ in range(experiments):
        np.random.RandomState(seed).shuffle(order)
        counts: dict = {}
        rows = []
        for i in order:
            if counts.get(labels[i], 0) < samples_per_label:
                rows.append(i)
                counts[labels[i]] = counts.get(labels[i], 0) + 1
        chosen.append(rows)
    return chosen


def classification(train_vectors, train_labels: Sequence, test_vectors, test_labels: Sequence,
                   selections: Sequence[Sequence[int]], seed: int) -> dict:
    """MTEB's classification protocol: for each experiment a LogisticRegression(max_iter=100,
    random_state=seed) fitted on that experiment's training rows (`undersample`), scored on
    every test row: accuracy, F1, precision and recall (macro and weighted), and for two test
    labels the average precision of the predicted labels (macro and weighted); the mean over
    the experiments, and each experiment's scores. Labels are compared as values; for the
    average precision the larger of two labels is the positive one."""
    import warnings

    import numpy as np

    _sklearn()
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score,
                                 precision_score, recall_score)

    classes = sorted(set(train_labels) | set(test_labels))
    code = {label: i for i, label in enumerate(classes)}  # sorted: the classifier's own order
    y_train = np.array([code[label] for label in train_labels])
    y_test = np.array([code[label] for label in test_labels])
    binary = len(np.unique(y_test)) == 2
    if binary:
        low, high = np.unique(y_test)
        y_test_ap = (y_test == high).astype(np.int64)
    model = LogisticRegression(max_iter=100, random_state=seed)
    train_vectors = np.asarray(train_vectors)
    test_vectors = np.asarray(test_vectors)
    per_experiment = []
    for rows in selections:
        if len(set(y_train[rows].tolist())) < 2:
            raise DataError("an experiment's training rows hold a single label; a classifier "
                            "needs two")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(train_vectors[rows], y_train[rows])
        predicted = model.predict(test_vectors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # undefined precision of a never-predicted label
            scores = {
                "accuracy": accuracy_score(y_test, predicted),
                "f1": f1_score(y_test, predicted, average="macro"),
                "f1_weighted": f1_score(y_test, predicted, average="weighted"),
                "precision": precision_score(y_test, predicted, average="macro"),
                "precision_weighted": precision_score(y_test, predicted, average="weighted"),
                "recall": recall_score(y_test, predicted, average="macro"),
                "recall_weighted": recall_score(y_test, predicted, average="weighted"),
                "ap": None, "ap_weighted": None}
            if binary:
                as_positive = (predicted == high).astype(np.int64)
                scores["ap"] = average_precision_score(y_test_ap, as_positive, average="macro")
                scores["ap_weighted"] = average_precision_score(y_test_ap, as_positive,
                                                                average="weighted")
        per_experiment.append({k: None if v is None else float(v) for k, v in scores.items()})
    means = {}
    for key in per_experiment[0]:
        values = [s[key] for s in per_experiment if s[key] is not None]
        means[key] = float(np.mean(values)) if values else None
    return {**means, "scores_per_experiment": per_experiment}


def undersample_multilabel(labels: Sequence[Sequence[Hashable]], samples_per_label: int,
                           experiments: int, seed: int) -> list[list[int]]:
    """The training rows of each multilabel experiment, as AbsTaskMultilabelClassification.
    _undersample_data_indices: one default_rng(seed) shuffles every experiment's fresh row
    order, and a row is taken while any of its labels has fewer than samples_per_label rows
    (a row without labels never is)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(experiments):
        order = list(np.arange(len(labels)))
        rng.shuffle(order)
        counts: dict = {}
        rows = []
        for i in order:
            if any(counts.get(label, 0) < samples_per_label for label in labels[i]):
                rows.append(int(i))
                for label in labels[i]:
                    counts[label] = counts.get(label, 0) + 1
        chosen.append(rows)
    return chosen


def multilabel_classification(train_vectors, train_labels: Sequence[Sequence[Hashable]],
                              test_vectors, test_labels: Sequence[Sequence[Hashable]],
                              selections: Sequence[Sequence[int]]) -> dict:
    """MTEB's multilabel protocol: the label sets binarized over the test set's labels (a
    training label the test set lacks is dropped), for each experiment a
    KNeighborsClassifier(n_neighbors=5) fitted on that experiment's training rows
    (`undersample_multilabel`) and every test row predicted: subset accuracy, label ranking
    average precision of the predictions, macro F1 and the Hamming score (the mean per-row
    intersection over union, 1 for two empty sets); the means over the experiments."""
    import warnings

    import numpy as np

    _sklearn()
    from sklearn.metrics import f1_score, label_ranking_average_precision_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer()
    y_test = binarizer.fit_transform([list(labels) for labels in test_labels])
    train_vectors = np.asarray(train_vectors)
    test_vectors = np.asarray(test_vectors)
    per_experiment = []
    for rows in selections:
        if len(rows) < 5:
            raise DataError(f"an experiment drew {len(rows)} training rows; the 5 nearest "
                            "neighbours need 5")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # training labels unknown to the test set
            y_train = binarizer.transform([list(train_labels[row]) for row in rows])
        model = KNeighborsClassifier(n_neighbors=5).fit(train_vectors[rows], y_train)
        predicted = model.predict(test_vectors)
        union = (y_test.astype(bool) | predicted.astype(bool)).sum(axis=1)
        both = (y_test.astype(bool) & predicted.astype(bool)).sum(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # undefined F1 of a label never predicted
            scores = {"accuracy": float(model.score(test_vectors, y_test)),
                      "lrap": float(label_ranking_average_precision_score(y_test, predicted)),
                      "f1": float(f1_score(y_test, predicted, average="macro")),
                      "hamming": float(np.where(union == 0, 1.0, both / np.maximum(union, 1))
                                       .mean())}
        per_experiment.append(scores)
    means = {key: float(np.mean([s[key] for s in per_experiment])) for key in per_experiment[0]}
    return {**means, "scores_per_experiment": per_experiment}


# ---------------------------------------------------------------- clustering

def clustering(vectors, labels: Sequence, experiments: int = 10, sample_size: int = 16_384,
               kmeans_batch: int = 512, max_documents: int | None = None,
               max_depth: int | None = None, seed: int = 42) -> dict:
    """MTEB's (fast) clustering, AbsTaskClustering: with one random.Random(seed), first
    max_documents rows drawn without replacement (all when None), then for each label level
    (a list label is a hierarchy; a missing level leaves the row out of that level) and each
    experiment sample_size rows drawn with replacement, clustered by MiniBatchKMeans (as many
    clusters as the level's labels, k-means++, n_init 1, random_state seed), and scored by
    V-measure and adjusted mutual information; the means and standard deviations over every
    level's experiments (main score: v_measure)."""
    import random

    import numpy as np

    _sklearn()
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics.cluster import adjusted_mutual_info_score, v_measure_score

    rng = random.Random(seed)
    vectors = np.asarray(vectors)
    labels = [list(label) if isinstance(label, (list, tuple)) else [label] for label in labels]
    if max_documents is not None:
        rows = rng.sample(range(len(labels)), k=min(len(labels), max_documents))
        vectors, labels = vectors[rows], [labels[i] for i in rows]
    depth = max(map(len, labels))
    depth = depth if max_depth is None else min(max_depth, depth)
    metrics = {"v_measure": v_measure_score, "ami": adjusted_mutual_info_score}
    scores: dict[str, dict[int, list[float]]] = {name: {} for name in metrics}
    for level in range(depth):
        valid = np.array([len(label) > level for label in labels])
        level_labels = np.array([label[level] for label in labels if len(label) > level])
        level_vectors = vectors[valid]
        model = MiniBatchKMeans(n_clusters=np.unique(level_labels).size,
                                batch_size=kmeans_batch, init="k-means++", n_init=1,
                                random_state=seed)
        for _ in range(experiments):
            rows = rng.choices(range(len(level_vectors)), k=sample_size)
            assigned = model.fit_predict(level_vectors[rows])
            for name, function in metrics.items():
                scores[name].setdefault(level, []).append(
                    float(function(level_labels[rows], assigned)))
    out: dict = {"levels": depth}
    for name, by_level in scores.items():
        flat = [value for values in by_level.values() for value in values]
        out[name] = float(np.mean(flat))
        out[f"{name}_std"] = float(np.std(flat))
    out["v_measures"] = {f"Level {level}": values
                         for level, values in scores["v_measure"].items()}
    return out



def clustering_sets(sets: Sequence[tuple], kmeans_batch: int = 500, seed: int = 42) -> dict:
    """MTEB's legacy clustering (AbsTaskClusteringLegacy, ClusteringEvaluator): each set of
    (vectors, labels) clustered whole by MiniBatchKMeans (as many clusters as the set's labels,
    n_init "auto", random_state seed: MTEB's evaluator seed, 42) and scored by V-measure; a set
    with one label scores 1. The mean and standard deviation over the sets (main score
    v_measure)."""
    import numpy as np

    _sklearn()
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics.cluster import v_measure_score

    measures = []
    for vectors, labels in sets:
        if len(set(labels)) <= 1:
            measures.append(1.0)
            continue
        model = MiniBatchKMeans(n_clusters=len(set(labels)), batch_size=kmeans_batch,
                                n_init="auto", compute_labels=True, random_state=seed)
        model.fit(np.asarray(vectors))
        measures.append(float(v_measure_score(labels, model.labels_)))
    return {"v_measure": float(np.mean(measures)), "v_measure_std": float(np.std(measures)),
            "v_measures": measures}
