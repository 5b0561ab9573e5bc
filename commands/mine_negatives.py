"""Mine hard negatives for (query, positive) pairs, without false negatives or silent padding."""
import os
from dataclasses import dataclass
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options

QUERY_BATCH = 256          # queries searched and filtered together: memory ~ batch x depth
_CACHE_LIMIT = 200_000     # guide-model vectors kept between batches


def run(pairs: Annotated[Optional[List[str]], typer.Argument(
            help="Pair records: `query` (or `anchor`) with `positive` text and/or "
                 "`positive_id` (a corpus id), optional `query_id`; several records per query "
                 "= several positives. - for stdin (the default).",
            show_default=False, metavar="PAIRS")] = None,
        corpus: Annotated[Optional[str], typer.Option(
            "--corpus", help="Where negatives come from: an index folder (ANN), an embeddings "
                             "stream (exact search), or text records (embedded with -m). "
                             "Default: the BEIR corpus with --beir, else the positives' texts.",
            metavar="CORPUS")] = None,
        beir: Annotated[Optional[str], typer.Option(
            "--beir", help="Take queries, positives (qrels graded --min-relevance or more) and "
                           "corpus from this BEIR folder.", metavar="DIR")] = None,
        split: options.Split = "train",
        min_relevance: Annotated[Optional[float], typer.Option(
            "--min-relevance", help="With --beir: a judgment is a positive when graded >= N "
                                    "(trec_eval's relevance level; default 1); one graded "
                                    "between 0 and N is no negative either.",
            metavar="N", show_default=False)] = None,
        prompt_field: Annotated[Optional[str], typer.Option(
            "--prompt-field", help="A field of the pair records holding each query's own "
                                   "prompt (task instruction), used instead of the query "
                                   "prompt and written to the rows.", metavar="FIELD",
            show_default=False)] = None,
        model: options.Model = None,
        num_negatives: Annotated[int, typer.Option(
            "-n", "--num-negatives", help="Negatives per query.")] = 5,
        range_min: Annotated[int, typer.Option(
            "--range-min", help="Skip this many of the best surviving candidates.")] = 0,
        range_max: Annotated[int, typer.Option(
            "--range-max", help="Consider only this many surviving candidates (searched: "
                                "range-max + the most pair records of any query).")] = 50,
        min_score: options.MinScore = None,
        max_score: Annotated[Optional[float], typer.Option(
            "--max-score", help="Drop candidates scoring above S.", metavar="S")] = None,
        absolute_margin: options.AbsoluteMargin = None,
        relative_margin: options.RelativeMargin = None,
        margin_per: Annotated[str, typer.Option(
            "--margin-per", help="query: the margins are measured from the query's weakest "
                                 "positive; positive: from each positive, and each (query, "
                                 "positive) pair gets its own negatives (NV-Retriever).")
        ] = "query",
        max_positive_similarity: Annotated[Optional[float], typer.Option(
            "--max-positive-similarity", help="Drop a candidate whose vector's cosine to a "
                                              "positive's is >= S (LG-ANNA: a likely false "
                                              "negative).", metavar="S",
            show_default=False)] = None,
        sampling: Annotated[str, typer.Option(
            "--sampling", help="top: the best candidates; random: a seeded sample of the "
                               "window.")] = "top",
        seed: options.Seed = 0,
        cross_encoder: Annotated[Optional[str], typer.Option(
            "--cross-encoder", help="Rescore candidates and positives with this "
                                    "cross-encoder before filtering and ranking.",
            metavar="MODEL")] = None,
        guide: options.Guide = None,
        guide_query_prompt: Annotated[Optional[str], typer.Option(
            "--guide-query-prompt", help="With --guide: the prompt the guide model embeds "
                                         "queries with (default its own query prompt).",
            metavar="TEXT", show_default=False)] = None,
        guide_doc_prompt: Annotated[Optional[str], typer.Option(
            "--guide-doc-prompt", help="With --guide: the prompt for positives and candidates "
                                       "(default its own document prompt).", metavar="TEXT",
            show_default=False)] = None,
        shape: Annotated[str, typer.Option(
            "--shape", help="Rows as sentence-transformers trains on them: triplet, n-tuple "
                             "(negative_1..n), labeled-pair, labeled-list.")] = "triplet",
        old_shape: options.alias(Optional[str], "--layout", "--shape", "shape") = None,
        with_scores: Annotated[bool, typer.Option(
            "--with-scores", help="Add the scores (labeled shapes: scores replace "
                                  "labels).")] = False,
        all_scores: Annotated[bool, typer.Option(
            "--all-scores", help="--with-scores, and for distillation every other scorer's "
                                 "scores too: the retriever's (retriever_scores) after "
                                 "--cross-encoder, the guide's (guide_scores) with "
                                 "--guide.")] = False,
        on_short: Annotated[str, typer.Option(
            "--on-short", help="A query with fewer than -n negatives: drop it, or keep it with "
                               "fewer (never padded).")] = "drop",
        stats: Annotated[Optional[str], typer.Option(
            "--save-stats", help="Write the counts (candidates seen, removed by each rule, queries "
                            "short, mean scores) to FILE as JSON.", metavar="FILE")] = None,
        old_stats: options.alias(Optional[str], "--stats", "--save-stats", "stats") = None,
        exact: options.Exact = False,
        ef: options.Ef = None,
        fields: options.TextField = None,
        old_fields: options.alias(Optional[List[str]], "--field", "--text-field", "fields")
        = None,
        query_prompt: options.QueryPrompt = None,
        query_prompt_name: options.QueryPromptName = None,
        doc_prompt: options.DocPrompt = None,
        doc_prompt_name: options.DocPromptName = None,
        old_corpus_prompt: options.alias(Optional[str], "--corpus-prompt", "--doc-prompt",
                                         "doc_prompt") = None,
        old_corpus_prompt_name: options.alias(Optional[str], "--corpus-prompt-name",
                                              "--doc-prompt-name", "doc_prompt_name") = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        trust_remote_code: options.TrustRemoteCode = False,
        shard: options.Shard = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        force: options.Force = False,
        progress: options.Progress = False,
        quiet: options.Quiet = False):
    """Mine hard negatives for (query, positive) pairs and write training rows in
    sentence-transformers' shapes. Candidates never include a known positive of the query (by
    id or identical text) nor the query itself; every removal is counted (stderr summary,
    --save-stats). Filters follow sentence-transformers' mine_hard_negatives: with an embeddings or
    text corpus, --sampling top and the same model, the rows are the same (ties in score go to
    the earlier corpus record); unlike there, --cross-encoder rescores even when no score rule
    is set. Scores are cosine similarities (cross-encoder scores after --cross-encoder), or the
    index's own scores for an index folder. The rules apply in this order: known positives,
    the query, judgments below --min-relevance, repeated texts, the margins and score bounds,
    --max-positive-similarity (cosine of the corpus vectors), --guide. With --margin-per
    positive every (query, positive) pair is filtered, sampled and kept or dropped on its own
    (removals and short counts are then per pair). Pairs and an embeddings or text
    corpus are held in memory (the corpus as one vector matrix); search memory is bounded by
    a query batch x corpus block. For corpora larger than memory, search an index folder.
    With --shard, only that shard's queries are mined (by query text); the corpus and search
    depth stay those of the whole job, so the shards' rows together are the unsharded run's.

    \b
    Example:
      vecpipe mine-negatives --beir nfcorpus --split train -o triplets.jsonl
      vecpipe mine-negatives pairs.jsonl --corpus idx/ -n 7 --range-min 10 \\
          --relative-margin 0.05 --shape n-tuple --save-stats stats.json -o train.parquet
      vecpipe mine-negatives --beir nfcorpus --shard auto -o mined/
    """
    given = dict(locals())
    import contextlib

    options.show_progress(progress)

    from vecpipe.cli import console
    from vecpipe.cli.models import load_cross_encoder
    from vecpipe.core.mining import MiningOptions
    from vecpipe.formats.parts import PartClaim, shard_output
    from vecpipe.formats.shards import parse_shard
    from vecpipe.formats.writers import resolve_output_format

    if output in (None, "-"):  # training rows carry no vectors: JSONL on a pipe
        output_format = resolve_output_format(output, output_format, vectors=False)
    settings = MiningOptions(num_negatives, range_min, range_max, min_score, max_score,
                             absolute_margin, relative_margin, sampling, seed, on_short,
                             margin_per, max_positive_similarity)
    _check_settings(settings)
    _check_sources(beir, min_relevance, prompt_field, guide,
                   (guide_query_prompt, guide_doc_prompt))
    _check_shape(shape, on_short)
    _check_prompt_field(prompt_field, shape, num_negatives)
    part = parse_shard(shard)
    part_file = shard_output(output, part, output_format)
    with contextlib.ExitStack() as hold:
        claim = None
        if part_file is not None:  # --shard I/N -o DIR/: DIR/part-0000I-of-0000N.<ext>
            output, output_format = part_file
            claim = hold.enter_context(PartClaim(output, _shard_job(given, output_format,
                                                                    part)))
            if claim.rows is not None:
                console.info(f"{output} is already complete: skipped")
                return
            for note in claim.notes():
                console.info(note)
        resolve_output_format(output, output_format, vectors=False)
        pair_set = _read_pairs(pairs, beir, split, input_format, min_relevance, prompt_field)
        source = _corpus_source(corpus, beir, split, fields)
        rescorer = load_cross_encoder(cross_encoder, device, trust_remote_code) \
            if cross_encoder else None
        vetoer = _Guide(guide, device, trust_remote_code, batch_size,
                        (guide_query_prompt, guide_doc_prompt)) if guide else None
        job = _prepare(pair_set, source, settings, model, device, trust_remote_code, force,
                       prompts=(query_prompt, query_prompt_name, doc_prompt,
                                doc_prompt_name),
                       batch_size=batch_size, ann={"exact": exact, "ef": ef})
        job.cross_encoder, job.guide = rescorer, vetoer
        if part is not None:
            _keep_shard(job.pairs, part)
        job.prompt_field, job.all_scores = prompt_field, all_scores
        _mine(job, shape, with_scores or all_scores, output, output_format)
        if claim is not None:
            claim.finish(job.miner.stats.rows_written)
    _report(job, stats, shape)


# Options that do not change the rows: --batch-size, --device, --trust-remote-code,
# --save-stats,
# -q. The models count by their folder's content when local (see _model_identity).
_JOB_OPTIONS = ("split", "num_negatives", "range_min", "range_max", "min_score", "max_score",
                "absolute_margin", "relative_margin", "sampling", "seed", "shape",
                "with_scores", "on_short", "exact", "ef", "fields", "query_prompt",
                "query_prompt_name", "doc_prompt", "doc_prompt_name", "input_format",
                "force")
# Options added later count only when set, so that parts made before them still match.
_SET_JOB_OPTIONS = {"min_relevance": None, "prompt_field": None, "margin_per": "query",
                    "max_positive_similarity": None, "guide_query_prompt": None,
                    "guide_doc_prompt": None, "all_scores": False}


def _shard_job(options: dict, part_format: str, shard):
    """What a `--shard I/N -o DIR/` part is made from: the pairs, the BEIR folder, the corpus
    (a file, or an index folder: its files), the models and the options that change rows."""
    from vecpipe.formats.parts import Job

    inputs = list(options["pairs"] or ([] if options["beir"] else ["-"]))
    inputs += [path for path in (options["beir"], options["corpus"]) if path]
    counted = {"--" + name.replace("_", "-"): options[name] for name in _JOB_OPTIONS}
    counted.update({"--" + name.replace("_", "-"): options[name]
                    for name, default in _SET_JOB_OPTIONS.items() if options[name] != default})
    counted.update({f"--{name.replace('_', '-')}": _model_identity(options[name], bundled)
                    for name, bundled in (("model", True), ("cross_encoder", False),
                                          ("guide", False))})
    counted["--output-format"] = part_format
    return Job(inputs, counted, shard)


def _model_identity(spec, bundled: bool):
    """-m, --cross-encoder, --guide as the job counts them; an unset one is None unless it
    stands for the bundled model (`bundled`)."""
    from vecpipe.cli.models import model_identity

    return None if spec is None and not bundled else model_identity(spec)


def _keep_shard(pair_set, shard) -> None:
    """Keep the queries of one shard (hashed by query text, the key pairs are grouped by). Done
    after the corpus and search depth are set from every pair, so each query is mined exactly
    as in the unsharded run."""
    from vecpipe.formats.shards import shard_mask

    keep = shard_mask([query.text for query in pair_set.queries], shard)
    pair_set.queries = [query for query, kept in zip(pair_set.queries, keep) if kept]


@dataclass
class _Job:
    pairs: object                 # PairSet
    corpus: object                # _ExactCorpus or _IndexCorpus
    model: object                 # Embedder for queries (and texts without a vector)
    miner: object
    query_prompt: str
    doc_prompt: str
    batch_size: int
    depth: int
    cross_encoder: object = None
    guide: object = None
    prompt_field: str | None = None
    all_scores: bool = False
    output_name: str = "stdout"
    output_format: str = ""


def _check_settings(settings) -> None:
    """The mining options' values, worded as the flags that set them."""
    from vecpipe.core.mining import MARGIN_PER, ON_SHORT, SAMPLINGS
    from vecpipe.formats.errors import UsageError

    s = settings
    if s.num_negatives < 1:
        raise UsageError(f"-n must be at least 1, got {s.num_negatives}")
    if s.range_min < 0:
        raise UsageError(f"--range-min must be >= 0, got {s.range_min}")
    if s.range_max <= s.range_min:
        raise UsageError(f"--range-max ({s.range_max}) must be larger than --range-min "
                         f"({s.range_min})")
    if s.num_negatives > s.range_max - s.range_min:
        raise UsageError(f"cannot take {s.num_negatives} negatives from ranks "
                         f"{s.range_min}..{s.range_max}",
                         hint="lower -n or --range-min, or raise --range-max")
    if s.sampling not in SAMPLINGS:
        raise UsageError(f"unknown --sampling {s.sampling!r}; use {'|'.join(SAMPLINGS)}")
    if s.on_short not in ON_SHORT:
        raise UsageError(f"unknown --on-short {s.on_short!r}; use {'|'.join(ON_SHORT)}")
    limit = s.max_positive_similarity
    if limit is not None and not -1 <= limit <= 1:
        raise UsageError(f"--max-positive-similarity is a cosine, between -1 and 1; got {limit}")
    if s.margin_per not in MARGIN_PER:
        raise UsageError(f"unknown --margin-per {s.margin_per!r}; use {'|'.join(MARGIN_PER)}")
    for name in ("absolute_margin", "relative_margin"):
        value = getattr(s, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if s.min_score is not None and s.max_score is not None and s.min_score > s.max_score:
        raise UsageError(f"--min-score {s.min_score} is above --max-score {s.max_score}")


def _check_sources(beir, min_relevance, prompt_field, guide, guide_prompts) -> None:
    """Options that apply to one kind of input or with another option only."""
    from vecpipe.formats.errors import UsageError

    if min_relevance is not None and not beir:
        raise UsageError("--min-relevance grades BEIR judgments: it needs --beir")
    if min_relevance is not None and min_relevance <= 0:
        raise UsageError(f"--min-relevance must be above 0 (grade 0 is judged not "
                         f"relevant), got {min_relevance:g}")
    if prompt_field is not None and beir:
        raise UsageError("--prompt-field names a field of the PAIRS records; BEIR queries "
                         "have none")
    if not guide and any(prompt is not None for prompt in guide_prompts):
        raise UsageError("--guide-query-prompt and --guide-doc-prompt need --guide MODEL")


def _check_shape(shape: str, on_short: str) -> None:
    from vecpipe.core.mining import SHAPES
    from vecpipe.formats.errors import UsageError

    if shape not in SHAPES:
        raise UsageError(f"unknown --shape {shape!r}; use {'|'.join(SHAPES)}",
                         hint="the file format is --output-format (jsonl, arrow, parquet)")
    if shape == "n-tuple" and on_short == "keep":
        raise UsageError("--shape n-tuple needs exactly -n negatives per row; "
                         "--on-short keep cannot fill it",
                         hint="use --on-short drop, or --shape triplet/labeled-list")


def _read_pairs(inputs, beir, split, input_format, min_relevance, prompt_field):
    from vecpipe.formats.errors import UsageError
    from vecpipe.core.mining import beir_pairs, read_pairs
    from vecpipe.core.space import check_same_space
    from vecpipe.formats.beir import beir_files
    from vecpipe.formats.readers import RecordStream

    if beir:
        if inputs:
            raise UsageError("give PAIRS or --beir, not both")
        return beir_pairs(beir_files(beir, split),
                          1 if min_relevance is None else min_relevance)
    return read_pairs(RecordStream(inputs, input_format, check=check_same_space), prompt_field)


# ---- the corpus ------------------------------------------------------------------------------

@dataclass
class _Source:
    path: str | None          # None: the positives' texts are the corpus
    fields: list


def _corpus_source(corpus, beir, split, fields) -> _Source:
    from vecpipe.formats.beir import beir_files

    if corpus is None and beir:
        return _Source(beir_files(beir, split).corpus, fields or ["title", "text"])
    return _Source(corpus, fields or ["text"])


class _ExactCorpus:
    """Vectors in memory (normalized), ids and texts: exact search by blocks. A text that
    occurs several times is searched once (its first record), so that a rank counts distinct
    texts, as in sentence-transformers, which de-duplicates its corpus."""

    def __init__(self, name, vectors, ids, texts, metadata, prompt):
        import numpy as np

        from vecpipe.core.mining import text_codes
        from vecpipe.core.vectors import normalized

        self.name = name
        self.ids = ids              # pa.Array of strings
        self.texts = texts          # pa.Array of strings
        self.codes = text_codes(texts)
        self.metadata = metadata    # vecpipe.* keys of the vectors ({} for embedded text)
        self.prompt = prompt        # the prompt the corpus texts were embedded with
        first_row_of_code = np.unique(self.codes, return_index=True)[1]
        self.searched = np.sort(first_row_of_code)        # the rows searched, ascending
        self._slot = np.searchsorted(self.searched, first_row_of_code[self.codes])
        self.duplicates = len(self.codes) - len(self.searched)
        self.vectors = normalized(vectors[self.searched] if self.duplicates else vectors)

    def search(self, queries, k):
        from vecpipe.core.vectors import exact_top_k

        hits = exact_top_k(queries, self.vectors, k)
        return hits.scores, self.searched[hits.rows]

    def row_scores(self, queries, rows):
        """Score of queries[i] against corpus row rows[i], on the search's scale."""
        return self.vector_scores(queries, self.vectors[self._slot[rows]])

    def vector_scores(self, queries, vectors):
        """Score of queries[i] against the model's vectors[i], on the search's scale."""
        import numpy as np

        from vecpipe.core.vectors import normalized

        return np.einsum("ij,ij->i", queries, normalized(vectors))

    def row_vectors(self, rows):
        """The (normalized) vectors of corpus rows."""
        return self.vectors[self._slot[rows]]

    def model_vectors(self, vectors):
        """The model's vectors in the space of row_vectors."""
        return vectors


class _IndexCorpus:
    """An index folder (core.index_open): HNSW search, or brute force with --exact."""

    def __init__(self, path, fields, ann):
        from vecpipe.formats.errors import DataError, UsageError
        from vecpipe.core.index_format import FLOAT_DTYPES
        from vecpipe.core.index_open import open_index
        from vecpipe.core.mining import join_fields, text_codes

        self.index = open_index(path)
        if self.index.layout == "lexical":
            raise UsageError("a lexical (BM25) index has no vectors to mine negatives with",
                             source=path, hint="mine with a vector index, an embeddings file "
                             "or the corpus records")
        self.name, self.metadata = path, self.index.metadata
        self.prompt = self.index.metadata.get("prompt", "")
        self.ids = self.index.ids().combine_chunks()
        self.texts = join_fields(self.index.rows(fields), fields, path)
        self.codes = text_codes(self.texts)
        self.duplicates = 0   # an index searches every record, repeated texts included
        quantized = self.index.dtype not in FLOAT_DTYPES
        if quantized and self.index.full_vectors() is None:
            raise DataError(f"a {self.index.dtype} index without full vectors cannot score "
                             "positives and candidates alike", source=path,
                             hint="rebuild it with --keep-vectors, or use a float index")
        self._quantized, self._ann, self._searchers = quantized, ann, {}

    def search(self, queries, k):
        if k not in self._searchers:
            self._searchers[k] = self.index.searcher(k, **self._ann,
                                                     rescore=4 if self._quantized else None)
        hits = self._searchers[k].search(queries)
        return hits.scores, hits.rows

    def row_scores(self, queries, rows):
        """As the searcher scores: in the index space, or on the full vectors it rescores
        with (quantized indexes)."""
        import numpy as np

        if self._quantized:
            vectors = np.asarray(self.index.full_vectors()[rows], dtype=np.float32)
            return self._paired(self.index.score_metric, queries, vectors)
        vectors = self.index.stored_vectors(rows).astype(np.float32)
        return self._paired(self.index.metric, self.index.encode(queries), vectors)

    def vector_scores(self, queries, vectors):
        if self._quantized:
            return self._paired(self.index.score_metric, queries, vectors)
        return self._paired(self.index.metric, self.index.encode(queries),
                            self.index.encode(vectors))

    def row_vectors(self, rows):
        """Float vectors of rows: the full ones of a quantized index, else the index's own."""
        import numpy as np

        if self._quantized:
            return np.asarray(self.index.full_vectors()[rows], dtype=np.float32)
        return self.index.stored_vectors(rows).astype(np.float32)

    def model_vectors(self, vectors):
        return vectors if self._quantized else self.index.encode(vectors).astype("float32")

    @staticmethod
    def _paired(metric, queries, vectors):
        from vecpipe.core.vectors import paired_similarity

        return paired_similarity(metric, queries, vectors[:, None, :])[:, 0]


def _load_corpus(source: _Source, pair_set, model_spec, device, trust_remote_code, force,
                 prompts, batch_size, ann):
    """(corpus, model): the corpus ready to search and the model that embeds queries."""
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError
    from vecpipe.core.mining import join_fields
    from vecpipe.formats.readers import read_table

    if source.path is None:
        model = _load_model(model_spec, device, trust_remote_code)
        return _embedded_corpus("positives", _positive_texts(pair_set), None, model, prompts,
                                batch_size), model
    if os.path.isdir(source.path):
        corpus = _IndexCorpus(source.path, source.fields, ann)
        model = _model_for_vectors(model_spec, corpus.metadata, source.path, device,
                                   trust_remote_code, force, corpus.index.query_dim)
        return corpus, model
    table = read_table([source.path])
    if table is None or table.num_rows == 0:
        raise DataError("the corpus is empty", source=source.path)
    id_name = names.find_id_column(table.schema)
    ids = names.batch_ids(table, id_name, on_null="keep")
    texts = join_fields(table, source.fields, source.path)
    if names.EMBEDDING in table.schema.names:
        metadata = names.read_meta(table.schema)
        vectors = names.vectors_to_numpy(table.column(names.EMBEDDING))
        model = _model_for_vectors(model_spec, metadata, source.path, device, trust_remote_code,
                                   force, vectors.shape[1])
        return _ExactCorpus(source.path, vectors, ids, texts, metadata,
                            metadata.get("prompt", "")), model
    model = _load_model(model_spec, device, trust_remote_code)
    return _embedded_corpus(source.path, texts, ids, model, prompts, batch_size), model


def _positive_texts(pair_set):
    import pyarrow as pa

    from vecpipe.formats.errors import DataError

    texts = {}
    for query in pair_set.queries:
        for positive in query.positives:
            if positive.text is None:
                raise DataError(f"positive_id {positive.id!r} needs a corpus to look it up",
                                source=positive.source, record=positive.record,
                                hint="pass --corpus, or give `positive` texts")
            texts.setdefault(positive.text, None)
    return pa.array(list(texts), pa.string())


def _embedded_corpus(name, texts, ids, model, prompts, batch_size):
    import numpy as np
    import pyarrow as pa

    from vecpipe.cli import console

    prompt = _corpus_prompt(model, prompts)
    if ids is None:
        ids = pa.array([str(i) for i in range(1, len(texts) + 1)])
    vectors = np.empty((len(texts), model.dim), dtype=np.float32)
    step = max(batch_size * 32, 1024)
    with console.progress(total=len(texts), desc="embedding corpus", unit="text") as bar:
        for start in range(0, len(texts), step):
            chunk = texts.slice(start, step).to_pylist()
            vectors[start:start + len(chunk)] = model.encode(chunk, batch_size, prompt)
            bar.update(len(chunk))
    return _ExactCorpus(name, vectors, ids, texts, {}, prompt)


def _corpus_prompt(model, prompts) -> str:
    """--doc-prompt(-name), else the model's document prompt."""
    from vecpipe.core.space import role_prompt

    return role_prompt(model, "doc", prompts[2], prompts[3])


def _query_prompt(model, corpus, prompts) -> str:
    """--query-prompt(-name), else the index's query prompt, else the model's `query` prompt."""
    from vecpipe.core.space import role_prompt

    recorded = getattr(getattr(corpus, "index", None), "query_prompt", None)
    return role_prompt(model, "query", prompts[0], prompts[1], recorded)


def _load_model(spec, device, trust_remote_code, metadata=None):
    """`metadata`: the corpus vectors', whose layers and pooling the queries' must match."""
    from vecpipe.cli.models import load_model, space_options

    return load_model(spec, device=device, trust_remote_code=trust_remote_code,
                      **space_options(metadata or {}))


def _model_for_vectors(spec, metadata, source, device, trust_remote_code, force, dim):
    """The model that made the corpus vectors: -m, checked against the metadata, or the
    metadata's model."""
    from vecpipe.core.space import check_model
    from vecpipe.formats.errors import DataError

    recorded = metadata.get("model")
    if spec is None and recorded is None:
        raise DataError("the corpus vectors name no model (JSONL carries no metadata)",
                        source=source, hint="pass -m MODEL, the model that embedded them")
    model = _load_model(spec or recorded, device, trust_remote_code, metadata)
    check_model(metadata, model, source, spec or recorded, dim=dim, force=force)
    return model


# ---- pairs against the corpus ----------------------------------------------------------------

def _prepare(pair_set, source, settings, model_spec, device, trust_remote_code, force, prompts,
             batch_size, ann):
    from vecpipe.core.mining import Miner

    corpus, model = _load_corpus(source, pair_set, model_spec, device, trust_remote_code, force,
                                 prompts, batch_size, ann)
    _resolve(pair_set, corpus)
    depth = settings.range_max + pair_set.search_depth_extra
    return _Job(pair_set, corpus, model, Miner(settings, corpus.codes),
                _query_prompt(model, corpus, prompts), corpus.prompt, batch_size, depth)


def _resolve(pair_set, corpus) -> None:
    """Find each positive's corpus row (by id, else by text) and fill in its text; find the
    corpus rows that are the queries themselves (by id or text); one positive per text."""
    from vecpipe.formats.errors import DataError
    from vecpipe.core.mining import first_rows

    positives = [p for q in pair_set.queries for p in q.positives]
    by_id = [p for p in positives if p.id is not None]
    for positive, row in zip(by_id, first_rows([p.id for p in by_id], corpus.ids)):
        if row is None:
            raise DataError(f"positive_id {positive.id!r} is not in the corpus "
                            f"({corpus.name})", source=positive.source, record=positive.record)
        positive.row = row
        if positive.text is None:
            positive.text = corpus.texts[row].as_py()
    by_text = [p for p in positives if p.row is None]
    for positive, row in zip(by_text, first_rows([p.text for p in by_text], corpus.texts)):
        positive.row = row
    queries = pair_set.queries
    query_ids = [(q, i) for q in queries for i in q.ids]
    for (query, _), row in zip(query_ids, first_rows([i for _, i in query_ids], corpus.ids)):
        if row is not None:
            query.rows.append(row)
    for query, row in zip(queries, first_rows([q.text for q in queries], corpus.texts)):
        if row is not None:
            query.rows.append(row)
    for query in queries:
        query.dedupe_positives()
        query.judged_rows = [row for row in first_rows(query.judged, corpus.ids)
                             if row is not None]


# ---- mining ----------------------------------------------------------------------------------

def _mine(job: _Job, shape, with_scores, output, output_format) -> None:
    from vecpipe.cli import console
    from vecpipe.core.mining import shape_batch, shape_schema
    from vecpipe.formats.writers import RecordWriter

    settings = job.miner.options
    extra = tuple(name for name, used in (("retriever", job.cross_encoder), ("guide", job.guide))
                  if used is not None and job.all_scores)
    schema = shape_schema(shape, job.pairs.anchor_field, settings.num_negatives, with_scores,
                          extra, job.prompt_field)
    queries = job.pairs.queries
    with RecordWriter(output, output_format, schema=schema) as writer, \
            console.progress(total=len(queries), desc="mining", unit="query") as bar:
        for start in range(0, len(queries), QUERY_BATCH):
            batch = queries[start:start + QUERY_BATCH]
            mined = _mine_batch(job, batch)
            writer.write(shape_batch(shape, schema, mined, with_scores, job.prompt_field))
            bar.update(len(batch))
    job.miner.stats.rows_written = writer.rows
    job.output_name = output or "stdout"
    job.output_format = writer.format


def _check_prompt_field(prompt_field, shape, num_negatives) -> None:
    """The prompt field is written to the rows: it must not take another column's name."""
    from vecpipe.core.mining import ANCHOR_FIELDS, shape_schema
    from vecpipe.formats.errors import UsageError

    taken = shape_schema(shape, "query", num_negatives, True, ("retriever", "guide")).names
    if prompt_field in (*taken, *ANCHOR_FIELDS, "label", "labels"):
        raise UsageError(f"--prompt-field {prompt_field!r} is also a column of the rows",
                         hint="rename the field in the pairs")


@dataclass
class _Unit:
    """What is mined as one: a query with all its positives, or (--margin-per positive) with
    one of them."""
    index: int                    # the query's place in its batch
    positives: list               # indexes into the query's positives
    found: object                 # Candidates


def _mine_batch(job: _Job, batch) -> list:
    query_vectors = _encode_queries(job.model, batch, job.batch_size, job.query_prompt)
    scores, rows = job.corpus.search(query_vectors, job.depth)
    positive_scores = _positive_scores(job, batch, query_vectors)
    candidates = [job.miner.exclude(query, rows[i], scores[i], positive_scores[i])
                  for i, query in enumerate(batch)]
    if job.cross_encoder is not None:
        candidates = _rescore(job, batch, candidates)
    units = _units(batch, candidates, job.miner.options.margin_per)
    for unit in units:
        unit.found = job.miner.filter_scores(unit.found)
    if job.miner.options.max_positive_similarity is not None:
        _drop_near_positives(job, batch, units)
    if job.guide is not None:
        job.guide.filter(job, batch, units)
    return [mined for unit in units if (mined := _chosen(job, batch[unit.index], unit))]


def _encode_queries(model, batch, batch_size, prompt):
    """Normalized query vectors; a query's own prompt (--prompt-field) replaces `prompt`."""
    import numpy as np

    from vecpipe.core.vectors import normalized

    vectors = np.empty((len(batch), model.dim), dtype=np.float32)
    prompts = [prompt if q.instruction is None else q.instruction for q in batch]
    for own in dict.fromkeys(prompts):
        at = [i for i, given in enumerate(prompts) if given == own]
        vectors[at] = model.encode([batch[i].text for i in at], batch_size, own)
    return normalized(vectors)


def _units(batch, candidates, margin_per) -> list:
    if margin_per == "query":
        return [_Unit(i, list(range(len(q.positives))), found)
                for i, (q, found) in enumerate(zip(batch, candidates))]
    return [_Unit(i, [j], found.for_positive(j))
            for i, (q, found) in enumerate(zip(batch, candidates))
            for j in range(len(q.positives))]


def _chosen(job: _Job, query, unit: _Unit):
    """The unit's negatives as a Mined row group, or None when it is dropped as short."""
    import numpy as np

    from vecpipe.core.mining import Mined

    positives = [query.positives[j].text for j in unit.positives]
    key = query.text if job.miner.options.margin_per == "query" else \
        f"{query.text}\0{positives[0]}"
    chosen = job.miner.choose(query, unit.found, key)
    if chosen is None:
        return None
    texts = job.corpus.texts.take(np.asarray(chosen.rows)).to_pylist()
    extra = {name: (list(map(float, pos)), list(map(float, found)))
             for name, (found, pos) in chosen.extra.items() if job.all_scores}
    return Mined(query.text, positives, chosen.positive_scores.tolist(), texts,
                 chosen.scores.tolist(), query.instruction, extra)


def _positive_scores(job: _Job, batch, query_vectors) -> list:
    """Each query's score against each of its positives: the corpus's own vector where the
    positive is in the corpus, else the positive text embedded with the corpus prompt."""
    import numpy as np

    positives = [p for q in batch for p in q.positives]
    owner = np.repeat(np.arange(len(batch)), [len(q.positives) for q in batch])
    scores = np.empty(len(positives), dtype=np.float32)
    inside = np.array([p.row is not None for p in positives], dtype=bool)
    if inside.any():
        rows = np.array([p.row for p in positives if p.row is not None], dtype=np.int64)
        scores[inside] = job.corpus.row_scores(query_vectors[owner[inside]], rows)
    if not inside.all():
        texts = [p.text for p in positives if p.row is None]
        vectors = job.model.encode(texts, job.batch_size, job.doc_prompt)
        scores[~inside] = job.corpus.vector_scores(query_vectors[owner[~inside]], vectors)
    return np.split(scores, np.cumsum([len(q.positives) for q in batch])[:-1])


def _drop_near_positives(job: _Job, batch, units) -> None:
    """--max-positive-similarity: candidates whose vector is that close to a positive's."""
    import numpy as np

    from vecpipe.core.mining import positive_similarity

    limit = np.float32(job.miner.options.max_positive_similarity)
    vectors = _positive_vectors(job, [p for q in batch for p in q.positives])
    first = np.cumsum([0] + [len(q.positives) for q in batch])
    for unit in units:
        near = positive_similarity(job.corpus.row_vectors(unit.found.rows),
                                   vectors[first[unit.index] + np.asarray(unit.positives)])
        unit.found = job.miner.drop(unit.found, near >= limit, "max_positive_similarity")


def _positive_vectors(job: _Job, positives):
    """The corpus's vector of each positive, or its text embedded with the corpus prompt."""
    import numpy as np

    inside = [i for i, p in enumerate(positives) if p.row is not None]
    outside = [i for i, p in enumerate(positives) if p.row is None]
    parts = [job.corpus.row_vectors(np.array([positives[i].row for i in inside], np.int64))]
    if outside:
        embedded = job.model.encode([positives[i].text for i in outside], job.batch_size,
                                    job.doc_prompt)
        parts.append(job.corpus.model_vectors(embedded))
    vectors = np.empty((len(positives), parts[0].shape[1]), dtype=np.float32)
    vectors[inside] = parts[0]
    if outside:
        vectors[outside] = parts[1]
    return vectors


def _rescore(job: _Job, batch, candidates) -> list:
    """Cross-encoder scores for every remaining candidate and every positive; the retriever's
    scores stay along as `retriever`."""
    import numpy as np

    from vecpipe.core.mining import Candidates

    pairs, sizes = [], []
    for query, found in zip(batch, candidates):
        texts = job.corpus.texts.take(np.asarray(found.rows)).to_pylist() if len(found.rows) \
            else []
        positives = [p.text for p in query.positives]
        pairs += [(query.text, t) for t in texts] + [(query.text, t) for t in positives]
        sizes += [len(texts), len(positives)]
    scores = np.asarray(job.cross_encoder.predict(pairs, batch_size=job.batch_size,
                                                  convert_to_numpy=True,
                                                  show_progress_bar=False), dtype=np.float32)
    parts = np.split(scores, np.cumsum(sizes)[:-1])
    return [Candidates(found.rows, parts[2 * i], parts[2 * i + 1],
                       {"retriever": (found.scores, found.positive_scores)})
            for i, found in enumerate(candidates)]


class _Guide:
    """A second embedding model that vetoes candidates it finds as close as a positive."""

    def __init__(self, spec, device, trust_remote_code, batch_size, prompts):
        from vecpipe.core.space import role_prompt

        self.model = _load_model(spec, device, trust_remote_code)
        self.batch_size = batch_size
        self.query_prompt = role_prompt(self.model, "query", prompts[0])
        self.doc_prompt = role_prompt(self.model, "doc", prompts[1])
        self._cache = {}     # corpus row -> guide vector

    def filter(self, job: _Job, batch, units) -> None:
        """Drop, in each unit, candidates scored >= the unit's weakest positive; the guide's
        scores stay along as `guide`."""
        import numpy as np

        queries = self._encode([q.text for q in batch], self.query_prompt)
        positives = self._encode([p.text for q in batch for p in q.positives], self.doc_prompt)
        first = np.cumsum([0] + [len(q.positives) for q in batch])
        self._embed_rows(job.corpus, np.concatenate([u.found.rows for u in units]))
        for unit in units:
            query, found = queries[unit.index], unit.found
            own = positives[first[unit.index] + np.asarray(unit.positives)] @ query
            vectors = np.stack([self._cache[r] for r in found.rows.tolist()]) if len(found.rows) \
                else np.zeros((0, self.model.dim), dtype=np.float32)
            found.extra["guide"] = (vectors @ query, own)
            unit.found = job.miner.drop(found, found.extra["guide"][0] >= np.min(own), "guide")

    def _encode(self, texts, prompt):
        from vecpipe.core.vectors import normalized

        return normalized(self.model.encode(texts, self.batch_size, prompt))

    def _embed_rows(self, corpus, rows) -> None:
        missing = sorted(set(rows.tolist()) - self._cache.keys())
        if not missing:
            return
        if len(self._cache) + len(missing) > _CACHE_LIMIT:
            self._cache.clear()
        texts = corpus.texts.take(missing).to_pylist()
        self._cache.update(zip(missing, self._encode(texts, self.doc_prompt)))


# ---- the report ------------------------------------------------------------------------------

def _report(job: _Job, stats_path, shape) -> None:
    import json

    from vecpipe.cli import console
    from vecpipe.formats.writers import text_output

    facts = {"corpus_records": len(job.corpus.texts),
             "corpus_repeated_texts": job.corpus.duplicates, **job.miner.stats.as_dict()}
    if stats_path:
        document = {"options": {**job.miner.options.__dict__, "shape": shape,
                                "depth": job.depth}, **facts}
        with text_output(stats_path) as out:
            out.write(json.dumps(document, indent=2) + "\n")
    removed = ", ".join(f"{name.replace('_', ' ')} {count:,}"
                        for name, count in facts["removed"].items() if count)
    console.info(
        f"{facts['queries']:,} queries, {facts['candidates_seen']:,} candidates seen; removed: "
        f"{removed or 'none'}; beyond --range-max {facts['beyond_range_max']:,}, skipped by "
        f"--range-min {facts['skipped_range_min']:,}")
    mined = "pairs" if job.miner.options.margin_per == "positive" else "queries"
    console.info(
        f"{facts['queries_short']:,} {mined} short of negatives "
        f"({facts['queries_without_negatives']:,} with none, {facts['queries_dropped']:,} "
        f"dropped); {facts['negatives']:,} negatives, {facts['rows_written']:,} rows -> "
        f"{job.output_name} ({job.output_format}); mean score: positives "
        f"{_fmt(facts['mean_positive_score'])}, negatives {_fmt(facts['mean_negative_score'])}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
