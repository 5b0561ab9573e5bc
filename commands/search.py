"""Search an index (or an embeddings stream, exactly) with text or vector queries."""
from typing import TYPE_CHECKING, Annotated, List, NamedTuple, Optional

import typer

from vecpipe.cli import options

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from vecpipe.core.vectors import Hits

STREAM_BLOCK_ROWS = 8192
DEFAULT_K, DEFAULT_MMR_DEPTH = 10, 100


def run(index: Annotated[str, typer.Argument(
            help="An index folder (from `vecpipe index`), or an embeddings file/stream to "
                 "search exactly without an index.", metavar="INDEX", show_default=False)],
        queries: Annotated[Optional[List[str]], typer.Argument(
            help="Query records: text (`text`, or --text-field) embedded with the index's model "
                 "and query prompt, or vectors (`embedding`). Files or - for stdin (the "
                 "default).",
            metavar="[QUERIES]...", show_default=False)] = None,
        k: options.TopK = None,
        exact: options.Exact = False,
        ef: options.Ef = None,
        rescore: Annotated[Optional[str], typer.Option(
            "--rescore", help="Fetch k*MULT candidates from a compressed index and "
                              "rescore them with the kept full vectors (or the float "
                              "query against the codes: i8 indexes do that on k*4 by "
                              "default, bit planes on k*10; pq's scan ranks by the codes "
                              "already). An index of FDEs (compress --fde) rescores by exact "
                              "Chamfer on its token vectors: `chamfer` is chamfer:10.",
            metavar="MULT|chamfer[:MULT]", show_default=False)] = None,
        min_score: options.MinScore = None,
        max_hits: Annotated[Optional[int], typer.Option(
            "--max-hits", min=1, help="Range search: every hit scoring at least --min-score, at "
                                      "most N a query, instead of the top k (faiss "
                                      "range_search); over HNSW the search deepens until each "
                                      "query's last hit scores below it.", metavar="N",
            show_default=False)] = None,
        calibrator: Annotated[Optional[str], typer.Option(
            "--calibrator", help="Add prob, each hit's probability of relevance from a "
                                 "calibrator (eval calibrate) fitted on this index's scores, "
                                 "given the scores of its query's top hits: at least the "
                                 "calibrator's depth is searched, then k kept.", metavar="PATH",
            show_default=False)] = None,
        min_prob: Annotated[Optional[float], typer.Option(
            "--min-prob", min=0.0, max=1.0, help="With --calibrator: drop hits whose prob is "
                                                 "below P, one cut for every query (the best k "
                                                 "of the rest come back; maybe none).",
            metavar="P", show_default=False)] = None,
        mmr: Annotated[Optional[float], typer.Option(
            "--mmr", min=0.0, max=1.0, help="Diversify: re-order the top --mmr-depth hits by "
                                            "maximal marginal relevance, LAMBDA*sim(q,d) - "
                                            "(1-LAMBDA)*max sim(d, chosen), from the stored "
                                            "vectors; score becomes the MMR score, similarity "
                                            "holds sim(q,d).", metavar="LAMBDA",
            show_default=False)] = None,
        mmr_depth: Annotated[Optional[int], typer.Option(
            "--mmr-depth", min=1, help="First-stage hits per query MMR chooses from (default "
                                       "100).", metavar="N", show_default=False)] = None,
        group_by: Annotated[Optional[str], typer.Option(
            "--group-by", help="Return k distinct groups: hits grouped by this stored field's "
                               "value (chunks of `embed --chunk-tokens`: parent_id, kept by "
                               "index --fields parent_id), each group with its best "
                               "--group-size hits, group by group, with group_score beside "
                               "score (a hit whose value is null is in no group); a TREC run "
                               "gets one line per group (docid the value, score the group "
                               "score). Searched deeper until k groups come back or rows run "
                               "out; with --rerank, groups of the reranked hits.",
            metavar="FIELD", show_default=False)] = None,
        group_size: Annotated[Optional[int], typer.Option(
            "--group-size", min=1, help="Hits kept per group (default 1); without "
                                        "--group-by, an index of chunks (it stores "
                                        "parent_id) is grouped by parent_id.", metavar="N",
            show_default=False)] = None,
        group_score: Annotated[Optional[str], typer.Option(
            "--group-score", help="max|sum|mean of a group's kept hits' scores (default max; "
                                  "sum and mean are over its best --group-size hits: "
                                  "searched deeper until each group has them).", metavar="HOW",
            show_default=False)] = None,
        filter_text: options.FilterExpr = None,
        fields: options.Fields = None,
        all_fields: options.AllFields = False,
        model: options.Model = None,
        prompt: options.Prompt = None,
        prompt_name: options.PromptName = None,
        text_fields: options.TextField = None,
        old_field: options.FieldForText = None,
        query: Annotated[Optional[List[str]], typer.Option(
            "--query", help="A query text given here instead of QUERIES (repeatable; ids q1, "
                            "q2, ...).", metavar="TEXT", show_default=False)] = None,
        like: Annotated[Optional[List[str]], typer.Option(
            "--like", help="More like this: search with the index's stored vector of the "
                           "record ID instead of queries, no model loaded (repeatable: their "
                           "mean). The records named are left out of the k hits.",
            metavar="ID", show_default=False)] = None,
        unlike: Annotated[Optional[List[str]], typer.Option(
            "--unlike", help="With --like: and less like this record (repeatable); the query "
                             "is 2*mean(like) - mean(unlike), unit length for cos and ip.",
            metavar="ID", show_default=False)] = None,
        rerank: Annotated[Optional[str], typer.Option(
            "--rerank", help="Rescore the top --rerank-depth hits of each text query with this "
                             "cross-encoder (hub name or folder), reading the query and the "
                             "stored text; only the reranked hits come back, by its score.",
            metavar="MODEL", show_default=False)] = None,
        rerank_depth: Annotated[Optional[int], typer.Option(
            "--rerank-depth", min=1, help="Hits per query the cross-encoder rescores (default "
                                          "max(100, k); at least k).", metavar="N",
            show_default=False)] = None,
        rerank_fields: Annotated[Optional[List[str]], typer.Option(
            "--rerank-field", help="Stored field the cross-encoder reads as the document "
                                   "(repeatable; default the fields the vectors were embedded "
                                   "from, else text).", metavar="FIELD",
            show_default=False)] = None,
        rerank_max_length: Annotated[Optional[int], typer.Option(
            "--rerank-max-length", min=1, help="Lower the cross-encoder's token window.",
            metavar="N", show_default=False)] = None,
        keep_first_score: Annotated[bool, typer.Option(
            "--keep-first-score", help="With --rerank: keep the first stage's score as "
                                       "first_score beside the new one.")] = False,
        hybrid: Annotated[Optional[List[str]], typer.Option(
            "--hybrid", help="Also search this index folder (repeatable; e.g. a lexical one "
                             "beside a dense INDEX) with the same queries, and fuse each "
                             "query's lists with --fuse; hits and stored fields are INDEX's, "
                             "so every index must hold the same ids.", metavar="IDX",
            show_default=False)] = None,
        hybrid_depth: Annotated[Optional[int], typer.Option(
            "--hybrid-depth", min=1, help="Hits each index contributes to the fusion (default "
                                          "100; at least k).", metavar="N",
            show_default=False)] = None,
        fuse: options.Fuse = None,
        fuse_norm: options.FuseNorm = None,
        rrf_k: options.RrfK = None,
        fuse_weights: options.FuseWeights = None,
        metric: options.Metric = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        batch_size: options.BatchSize = 32,
        query_batch: Annotated[int, typer.Option(
            "--query-batch", min=1, help="Queries read and searched together.")] = 1024,
        threads: options.Threads = 0,
        device: options.Device = "auto",
        backend: options.Backend = "auto",
        force: options.Force = False,
        quiet: options.Quiet = False):
    """Find the k nearest records for each query (k is 10 unless -k says). One output row per
    hit: query_id, rank (1-based), id, score (a similarity: larger is better whatever the
    metric) and the requested stored fields; or a TREC run file. Scores: cos -> cosine, ip -> dot product, l2sq -> minus
    the squared distance, hamming -> fraction of equal bits. On a terminal (no -o or
    --output-format): a table per query instead, cut to its width (`--output-format table`
    asks for it on a pipe); text lines on stdin are answered one at a time, as they arrive.
    More like this: --like ID (and --unlike ID) makes the query of stored records instead,
    2*mean(like) - mean(unlike), without loading a model; those records are not hits.
    Hybrid: --hybrid IDX searches more indexes (dense or lexical) with the same queries and
    fuses each query's lists (--fuse, as `merge --fuse`); the score is the fused one.

    \b
    Example:
      vecpipe search idx --query "how do I parse JSON?" --fields text
      echo "how do I parse JSON?" | vecpipe search idx --fields text   # a line per query
      vecpipe search idx queries.jsonl -k 100 --output-format trec -o run.trec
      vecpipe search idx queries.jsonl --filter 'lang == "en" and year >= 2020' --rescore 4
      vecpipe search docs.arrow queries.jsonl   # no index: exact search over the stream
      vecpipe search idx --like doc42 --unlike doc7 --fields title   # more like doc42
      vecpipe search idx-bm25 queries.jsonl -k 100 --output-format trec   # a lexical index
      vecpipe search idx queries.jsonl --rerank cross-encoder/ms-marco-MiniLM-L-6-v2 -k 10
      vecpipe search idx queries.jsonl --hybrid idx-bm25 -k 100   # dense + BM25, RRF-fused
      vecpipe search idx-chunks queries.jsonl --group-by parent_id --group-size 3 -k 10
    """
    import os

    from vecpipe.formats.errors import DataError, UsageError

    fields = ",".join(fields) if fields else None
    if index != "-" and not os.path.exists(index):  # before the options that depend on its kind
        raise DataError("no such index folder or embeddings file", source=index)
    if fields and all_fields:
        raise UsageError("give --fields or --all-fields, not both")
    if query and queries:
        raise UsageError("give QUERIES or --query, not both")
    _check_backend(backend)
    _check_range_options(max_hits, min_score, mmr, k_given=k is not None)
    if mmr_depth is not None and mmr is None:
        raise UsageError("--mmr-depth needs --mmr LAMBDA")
    k = DEFAULT_K if k is None else k
    _check_rerank_options(rerank, like, rerank_depth=rerank_depth, rerank_fields=rerank_fields,
                          rerank_max_length=rerank_max_length, keep_first_score=keep_first_score)
    _check_like_options(like, unlike, queries, query, model=model, prompt=prompt,
                        prompt_name=prompt_name, text_fields=text_fields or old_field)
    fmt = _output_format(output, output_format)
    query_options = dict(model=model, prompt=prompt, prompt_name=prompt_name,
                         text_fields=text_fields or ["text"],
                         device=device, force=force, input_format=input_format,
                         model_batch_size=batch_size, backend=backend)
    rescore, chamfer = _parse_rescore(rescore)
    if os.path.isdir(index):
        if metric is not None:
            raise UsageError("--metric applies to an embeddings-stream INDEX; an index folder "
                             "has its own")
        if hybrid:
            _check_hybrid_options(like=like, min_score=min_score, max_hits=max_hits,
                                  chamfer=chamfer)
            lists = [index, *hybrid]
            searcher = HybridSearch(lists, k, options.fusion(fuse or "rrf", fuse_norm, rrf_k,
                                                             fuse_weights, len(lists)),
                                    hybrid_depth, exact=exact, ef=ef, rescore=rescore,
                                    filter_text=filter_text, fields=fields,
                                    all_fields=all_fields, threads=threads)
        else:
            _check_fusion_options(fuse=fuse, fuse_norm=fuse_norm, rrf_k=rrf_k is not None,
                                  fuse_weights=fuse_weights, hybrid_depth=hybrid_depth)
            searcher = IndexSearch(index, k, exact, ef, rescore, min_score, filter_text,
                                   fields, all_fields, threads, like=like, unlike=unlike,
                                   chamfer=chamfer)
        if not searcher.needs_vectors:
            _check_lexical_options(model=model, prompt=prompt, prompt_name=prompt_name,
                                   like=like)
    elif hybrid:
        raise UsageError("--hybrid needs an index folder INDEX; an embeddings stream is "
                         "searched alone", hint="index it first")
    elif like:
        raise UsageError("--like needs an index folder (it searches with the stored vectors); "
                         "INDEX is an embeddings stream", hint="index it first")
    else:
        if ef is not None or rescore is not None:
            raise UsageError("--ef and --rescore need an index folder; an embeddings stream "
                             "is searched exactly")
        searcher = StreamSearch(index, k, min_score, filter_text, fields, all_fields, metric)
        if searcher.metadata.get("fde"):
            raise UsageError("INDEX holds FDEs (compress --fde): their queries are encoded and "
                             "rescored through an index folder", source=index,
                             hint=f"vecpipe index {index} -o IDX, then search IDX")
    pipeline = Pipeline(searcher, None if max_hits else k)
    if hybrid:
        pipeline.metadata["fusion"] = searcher.described()
    searcher.max_hits = max_hits
    if rerank:
        add_rerank_stage(pipeline, rerank, rerank_depth, rerank_fields, rerank_max_length,
                         keep_first_score, batch_size=batch_size, device=device)
    if mmr is not None:
        add_mmr_stage(pipeline, mmr, mmr_depth or DEFAULT_MMR_DEPTH)
    if group_by is None and (group_size is not None or group_score is not None):
        group_by = _chunks_parent(searcher)
    _check_group_options(group_by, group_size, group_score, max_hits, mmr)
    if group_by is not None:
        add_group_stage(pipeline, group_by, group_size or 1, group_score or "max")
    _check_calibrator_options(calibrator, min_prob, min_score=min_score, max_hits=max_hits,
                              rerank=rerank, mmr=mmr, group_by=group_by, hybrid=hybrid)
    if calibrator is not None:
        add_calibration_stage(pipeline, calibrator, min_prob, force)
    # a stream is scanned once: its range search is one pass max_hits deep, thresholded
    searcher.depth = max_hits if max_hits and isinstance(searcher, StreamSearch) \
        else pipeline.depth()
    if like:
        results, headings = searcher.like_results(), [like_heading(like, unlike)]
    else:
        if query:
            query_options["text_fields"] = ["text"]
        reader = QueryReader(queries, searcher, batch_size=query_batch, given=query,
                             keep_texts=fmt == "table", prompt_line=not quiet, **query_options)
        results, headings = searcher.results(reader), reader.texts
    results = pipeline.run(results)
    if fmt == "table":
        write_hit_tables(results, output, headings)
    else:
        write_hits(results, pipeline.schema(), output, fmt, pipeline.metadata)


QUERY_OPTION_FLAGS = {"model": "-m/--model", "prompt": "--prompt", "prompt_name": "--prompt-name",
                      "text_fields": "--text-field", "like": "--like"}


def _check_like_options(like, unlike, queries, query, **text_query_options) -> None:
    """--like/--unlike replace the queries: QUERIES, --query and the options that embed text
    queries are refused with them rather than ignored."""
    from vecpipe.formats.errors import UsageError

    if unlike and not like:
        raise UsageError("--unlike needs --like: it moves a query made of liked records")
    if not like:
        return
    if queries or query:
        raise UsageError("give --like or queries (QUERIES, --query), not both")
    given = [QUERY_OPTION_FLAGS[key] for key, value in text_query_options.items() if value]
    if given:
        raise UsageError(f"{given[0]} applies to text queries; --like searches with the "
                         "index's stored vectors")
    both = sorted(set(like) & set(unlike or ()))
    if both:
        raise UsageError(f"{both[0]!r} is given to both --like and --unlike")


CHAMFER_MULTIPLE = 10  # --rescore chamfer: the FDE search's k*10 candidates


def _parse_rescore(value: str | None) -> tuple[int | None, bool]:
    """--rescore MULT | chamfer | chamfer:MULT -> (the multiple, whether chamfer was named)."""
    from vecpipe.formats.errors import UsageError

    if value is None:
        return None, False
    chamfer = value == "chamfer" or value.startswith("chamfer:")
    try:
        number = CHAMFER_MULTIPLE if value == "chamfer" else int(value.removeprefix("chamfer:"))
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"--rescore {value!r}: give a multiple of k (an integer >= 1), "
                         "chamfer, or chamfer:MULT")
    return number, chamfer


def _check_lexical_options(**vector_options) -> None:
    """Options that embed queries (or use stored vectors) are refused for a lexical index."""
    from vecpipe.formats.errors import UsageError

    given = [QUERY_OPTION_FLAGS[key] for key, value in vector_options.items() if value]
    if given:
        raise UsageError(f"{given[0]} applies to vector indexes; a lexical (BM25) index is "
                         "searched with the query text")


def _check_range_options(max_hits, min_score, mmr, k_given: bool) -> None:
    """--max-hits is range search: it needs --min-score and replaces -k (refused if given)."""
    from vecpipe.formats.errors import UsageError

    if max_hits is None:
        return
    if min_score is None:
        raise UsageError("--max-hits needs --min-score: range search returns every hit "
                         "scoring at least that")
    if mmr is not None:
        raise UsageError("--mmr chooses among the top --mmr-depth hits; give it -k, not "
                         "--max-hits")
    if k_given:
        raise UsageError("give -k or --max-hits, not both: range search returns every hit "
                         "above --min-score")


def add_mmr_stage(pipeline, lam: float, depth: int) -> None:
    """--mmr: the top `depth` first-stage hits re-ordered by maximal marginal relevance."""
    import pyarrow as pa

    from vecpipe.formats.errors import UsageError

    searcher = pipeline.searcher
    if not hasattr(searcher, "index"):
        raise UsageError("--mmr needs an index folder: an embeddings stream keeps no stored "
                         "vectors to compare hits with", hint="index it first")
    if searcher.index.layout == "lexical":  # with --hybrid, INDEX's vectors are compared
        raise UsageError("--mmr compares stored vectors; a lexical (BM25) index has none")
    pipeline.depths.append(depth)
    pipeline.extra_fields.append(pa.field("similarity", pa.float32()))
    pipeline.metadata["mmr"] = str(lam)
    pipeline.metadata["mmr_depth"] = str(depth)

    def stage(results):
        from vecpipe.core.diversity import index_mmr
        from vecpipe.formats.errors import ParameterError

        for batch in results:
            vectors = batch.query.vectors
            if vectors is None:  # --like: the query is made of stored records
                vectors = searcher.like.vector if searcher.like is not None else None
            try:
                hits, similarity = index_mmr(searcher.index, vectors, batch.hits, lam,
                                             pipeline.k or depth, encoded=batch.query.encoded)
            except ParameterError as err:
                raise UsageError(f"--mmr: {err.message}", source=err.source,
                                 hint=err.hint) from None
            yield batch._replace(hits=hits, extra={**(batch.extra or {}),
                                                   "similarity": similarity})

    pipeline.stages.append(stage)


_CALIBRATOR_CONFLICTS = {"min_score": "--min-score", "max_hits": "--max-hits",
                         "rerank": "--rerank", "mmr": "--mmr", "group_by": "--group-by",
                         "hybrid": "--hybrid"}


def _check_calibrator_options(calibrator, min_prob, **given) -> None:
    """A calibrator maps the first stage's scores of a top-k search: --min-prob needs one, and
    options that cut the hits by score or replace their scores are refused beside it."""
    from vecpipe.formats.errors import UsageError

    if min_prob is not None and calibrator is None:
        raise UsageError("--min-prob needs --calibrator: it cuts the calibrated probability",
                         hint="fit one with vecpipe eval calibrate; --min-score cuts the score")
    clashes = [_CALIBRATOR_CONFLICTS[name] for name, value in given.items()
               if value not in (None, False, [])]
    if calibrator is not None and clashes:
        raise UsageError(f"--calibrator maps the scores of a plain top-k search; not with "
                         f"{', '.join(clashes)}", hint="--min-prob is the threshold it gives")


def add_calibration_stage(pipeline, path: str, min_prob, force: bool) -> None:
    """--calibrator: a `prob` column, P(relevant) from each hit's score and its query's top
    calibrator-depth scores; --min-prob drops the hits below it (the rest move up)."""
    import pyarrow as pa

    from vecpipe.core.calibration import read_calibrator

    calibrator = read_calibrator(path)
    _check_calibrator_space(calibrator, pipeline.searcher, path, force)
    pipeline.depths.append(calibrator.depth)
    pipeline.extra_fields.append(pa.field("prob", pa.float32()))
    pipeline.metadata["calibrator"] = path
    if min_prob is not None:
        pipeline.metadata["min_prob"] = str(min_prob)

    def stage(results):
        import numpy as np

        for batch in results:
            prob = calibrator.probabilities(batch.hits.scores, batch.hits.rows >= 0)
            batch = batch._replace(extra={**(batch.extra or {}), "prob": prob.astype(np.float32)})
            yield batch if min_prob is None else probable_hits(batch, prob >= min_prob)

    pipeline.stages.append(stage)


def _check_calibrator_space(calibrator, searcher, path: str, force: bool) -> None:
    """The calibrator's scores must be this index's: same model (warn when it names none)."""
    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError

    fitted, searched = calibrator.provenance.get("model"), (searcher.metadata or {}).get("model")
    if fitted is None:
        console.warn(f"{path} names no model (eval calibrate --space): its probabilities hold "
                     "only for the scores it was fitted on")
    elif fitted != searched and not force:
        raise DataError(f"the calibrator was fitted on scores of {fitted}; the index holds "
                        f"{searched or 'no model'}", source=path,
                        hint="fit one on a run of this index, or --force")


def probable_hits(batch, keep):
    """The hits where `keep`, moved to the front of their query's row in score order, the
    others dropped: ranks stay 1..n."""
    import numpy as np

    from vecpipe.core.vectors import Hits

    keep = keep & (batch.hits.rows >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")
    kept = np.take_along_axis(keep, order, 1)
    rows = np.where(kept, np.take_along_axis(batch.hits.rows, order, 1), -1)
    scores = np.where(kept, np.take_along_axis(batch.hits.scores, order, 1), -np.inf)
    extra = {name: np.take_along_axis(np.asarray(values), order, 1)
             for name, values in (batch.extra or {}).items()}
    return batch._replace(hits=Hits(rows, scores.astype(np.float32)), extra=extra)


def _chunks_parent(searcher) -> str | None:
    """`parent_id` when the index holds chunks (`embed --chunk-tokens`, stored parent_id)."""
    from vecpipe.formats.schema import PARENT_ID

    index = getattr(searcher, "index", None)
    return PARENT_ID if index is not None and PARENT_ID in index.fields else None


def _check_group_options(group_by, group_size, group_score, max_hits, mmr) -> None:
    from vecpipe.core.grouping import GROUP_SCORES
    from vecpipe.formats.errors import UsageError

    if group_by is None:
        given = "--group-size" if group_size is not None else \
            "--group-score" if group_score is not None else None
        if given:
            raise UsageError(f"{given} needs --group-by FIELD (an index of chunks, storing "
                             "parent_id, is grouped by it)")
        return
    if max_hits:
        raise UsageError("--group-by returns k groups; give it -k, not --max-hits")
    if mmr is not None:
        raise UsageError("give --group-by or --mmr, not both")
    if group_score is not None and group_score not in GROUP_SCORES:
        raise UsageError(f"--group-score {group_score}: use {'|'.join(GROUP_SCORES)}")


def add_group_stage(pipeline, field: str, size: int, score: str) -> None:
    """--group-by: k groups per query (distinct values of a stored field), each with its best
    `size` hits; the output is up to k*size rows a query, group by group, and the field is
    added to the stored fields output. Queries that find fewer than k groups are searched
    again deeper, unless an earlier stage (rerank) rescored the hits: those are grouped as
    they come."""
    import pyarrow as pa

    from vecpipe.core.grouping import first_depth, group_keys
    from vecpipe.formats.errors import DataError, ParameterError, UsageError

    searcher, k = pipeline.searcher, pipeline.k
    if not hasattr(searcher, "index"):
        raise UsageError("--group-by needs an index folder: an embeddings stream is read "
                         "once and cannot be searched deeper", hint="index it first")
    index = searcher.index
    if field not in index.fields:
        raise DataError(f"--group-by {field}: not stored (stored: {', '.join(index.fields)})",
                        source=searcher.source, hint="index with --fields FIELD")
    try:
        keys = group_keys(index.rows([field]).column(field))
    except ParameterError as err:
        raise DataError(f"--group-by {field}: {err.message}", source=searcher.source) from None
    if field not in searcher.rows.column_names:
        searcher.rows = index.rows([*searcher.rows.column_names, field])
        searcher.schema = _output_schema(searcher.rows.schema)
    deepen = not pipeline.stages
    pipeline.depths.append(first_depth(k, size))
    pipeline.k = k * size
    pipeline.extra_fields.append(pa.field("group_score", pa.float32()))
    pipeline.metadata.update(group_by=field, group_size=str(size), group_score=score)

    def stage(results):
        import numpy as np

        from vecpipe.core.grouping import deepened_groups, group_hits

        for batch in results:
            def search(which, depth, query=batch.query):
                return searcher.hits_for(query_subset(query, which), depth)

            if deepen:
                groups = deepened_groups(search, batch.hits, keys, k, size, score,
                                         searcher.depth, index.count)
            else:
                groups = group_hits(batch.hits, keys, k, size, score).trimmed()
            at = np.maximum(groups.positions, 0)
            extra = {name: np.take_along_axis(np.asarray(values), at, 1)
                     for name, values in (batch.extra or {}).items()}
            yield batch._replace(hits=groups.hits,
                                 extra={**extra, "group_score": groups.group_scores})

    pipeline.stages.append(stage)


def _check_rerank_options(rerank, like, **rerank_options) -> None:
    from vecpipe.formats.errors import UsageError

    if rerank is None:
        given = next((key for key, value in rerank_options.items() if value), None)
        if given:
            name = "--rerank-field" if given == "rerank_fields" else \
                "--" + given.replace("_", "-")
            raise UsageError(f"{name} needs --rerank")
    elif like:
        raise UsageError("--rerank needs text queries; --like searches with stored vectors")


RERANK_OPTION_OF = {"depth": "--rerank-depth", "fields": "--rerank-field",
                    "max_length": "--rerank-max-length", "model": "--rerank",
                    "batch_size": "--batch-size"}


def _rerank_flagged(err):
    from vecpipe.formats.errors import DataError, UsageError

    option = RERANK_OPTION_OF.get(err.parameter, "--rerank")
    kind = DataError if err.parameter == "fields" else UsageError
    return kind(f"{option}: {err.message}", source=err.source, hint=err.hint)


def add_rerank_stage(pipeline, spec, depth, fields, max_length, keep_first_score, batch_size,
                     device) -> None:
    """--rerank: the top `depth` hits of each query rescored by a cross-encoder, loaded when
    the first text queries arrive (vector queries are refused before any model loads)."""
    import pyarrow as pa

    from vecpipe.core.rerank import FIRST_SCORE, DocumentFields, Reranker, document_fields
    from vecpipe.formats.errors import ParameterError

    searcher, k = pipeline.searcher, pipeline.k
    depth = depth or max(100, k or 0)
    index = getattr(searcher, "index", None)
    try:
        if index is not None:
            chosen = document_fields(index.metadata, index.fields, fields,
                                     index.rows().schema)
        else:
            chosen = DocumentFields(tuple(fields or ("text",)))
        probe = Reranker(None, spec, depth, batch_size, fields=chosen)
        if k is not None:
            probe.check_k(k)
    except ParameterError as err:
        raise _rerank_flagged(err) from None
    pipeline.depths.append(depth)
    if keep_first_score:
        pipeline.extra_fields.append(pa.field(FIRST_SCORE, pa.float32()))
    state = {}

    def reranker():
        if "reranker" not in state:
            from vecpipe.cli.models import cross_encoder_identity, load_cross_encoder

            model = load_cross_encoder(spec, device=device, trust_remote_code=None,
                                       max_length=max_length)
            name, sha = cross_encoder_identity(spec)
            state["reranker"] = Reranker(model, name, depth, batch_size, sha=sha,
                                         keep_first_score=keep_first_score, fields=chosen)
            pipeline.metadata.update(state["reranker"].metadata())
        return state["reranker"]

    def stage(results):
        from vecpipe.core.rerank import documents_of
        from vecpipe.formats.errors import UsageError

        for batch in results:
            texts = batch.query.texts
            if texts is None or any(text is None for text in texts):
                raise UsageError("--rerank: vector queries cannot be reranked: the "
                                 "cross-encoder reads the query text", hint="give text queries")
            try:
                stored = index.rows(list(chosen.names)) if index is not None else batch.rows
                hits, first = reranker().rerank(texts, batch.hits,
                                                documents_of(stored, chosen))
            except ParameterError as err:
                raise _rerank_flagged(err) from None
            extra = dict(batch.extra or {})
            if keep_first_score:
                extra[FIRST_SCORE] = first
            yield batch._replace(hits=hits, extra=extra or None)

    pipeline.stages.append(stage)


def _check_backend(backend: str) -> None:
    from vecpipe.cli.models import QUERY_BACKENDS
    from vecpipe.formats.errors import UsageError

    if backend not in QUERY_BACKENDS:
        raise UsageError(f"--backend {backend}: search embeds queries with "
                         f"{'|'.join(QUERY_BACKENDS)}")


def like_query_id(like, unlike) -> str:
    """The query_id of a --like search's hits: `like:a,b`, `;unlike:c` after it."""
    query_id = "like:" + ",".join(dict.fromkeys(like))
    return query_id + (";unlike:" + ",".join(dict.fromkeys(unlike)) if unlike else "")


def like_heading(like, unlike) -> str:
    heading = "like: " + ", ".join(dict.fromkeys(like))
    return heading + ("; unlike: " + ", ".join(dict.fromkeys(unlike)) if unlike else "")


class QueryBatch(NamedTuple):
    """One batch of queries as QueryReader yields it."""

    ids: list
    vectors: "np.ndarray | None"  # float queries, or codes when `encoded`; None: texts only
    encoded: bool
    texts: "list | None"          # each query's text (None for a vector query); None: vectors
    tokens: "list | None" = None  # FDE index: each query's token vectors (Chamfer rescoring)


class ResultBatch(NamedTuple):
    """What a searcher's results() and every pipeline stage yield, one per query batch."""

    query: QueryBatch
    hits: "Hits"        # rows (queries x width, -1 = none) index `rows`; scores alike
    rows: "pa.Table"    # id and the requested fields
    extra: "dict | None" = None  # column name -> (queries x width) values beside each hit


class Pipeline:
    """The stages after the first search, in order (each takes and yields ResultBatch), and
    what they add to the output: columns after `score` and schema metadata. `depth()` is how
    many hits the first stage fetches per query for them; the last stage keeps k."""

    def __init__(self, searcher, k: int | None):
        self.searcher, self.k = searcher, k
        self.stages = []          # functions: iterator of ResultBatch -> iterator
        self.depths = []          # first-stage depths the stages need
        self.extra_fields = []    # pyarrow fields the stages add after `score`
        self.metadata = {}        # vecpipe.* metadata of the output (keys without prefix)

    def depth(self) -> int:
        return max([self.k or 0, *self.depths]) or 1

    def run(self, results):
        for stage in self.stages:
            results = stage(results)
        return kept_hits(results, self.k) if self.k is not None else results

    def schema(self):
        import pyarrow as pa

        schema = self.searcher.schema
        at = schema.get_field_index("score") + 1
        fields = list(schema)
        return pa.schema(fields[:at] + self.extra_fields + fields[at:])


def kept_hits(results, k: int):
    """The best k hits of each query (hits are sorted by score, best first)."""
    for batch in results:
        hits = batch.hits
        if hits.rows.shape[1] > k:
            from vecpipe.core.vectors import Hits

            extra = {name: values[:, :k] for name, values in (batch.extra or {}).items()}
            batch = batch._replace(hits=Hits(hits.rows[:, :k], hits.scores[:, :k]),
                                   extra=extra or batch.extra)
        yield batch


def _output_format(output, output_format) -> str:
    """As every command's, plus `trec` and `table`; a terminal given no -o, --output-format or
    $VECPIPE_OUTPUT_FORMAT gets the table."""
    import sys

    from vecpipe.formats.writers import (OUTPUT_FORMATS, environment_format,
                                         resolve_output_format)

    extra = ("trec", "table")
    fmt = resolve_output_format(output, output_format, extra=extra, vectors=False)
    to_terminal = output in (None, "-") and sys.stdout is not None and sys.stdout.isatty()
    if output_format == "auto" and to_terminal \
            and environment_format(OUTPUT_FORMATS + extra) is None:
        return "table"
    return fmt


# ---- queries ----------------------------------------------------------------------------------

class GivenQueries:
    """`--query TEXT` values as a record stream of one batch: ids q1, q2, ... and `text`."""

    def __init__(self, texts):
        import pyarrow as pa

        from vecpipe.formats.readers import SourceBatch

        batch = pa.record_batch({"id": [f"q{n}" for n in range(1, len(texts) + 1)],
                                 "text": list(texts)})
        self.schema, self.metadata, self.inputs = batch.schema, {}, ["--query"]
        self._items = [SourceBatch(batch, "--query", 1)]

    def __iter__(self):
        return iter(self._items)


class TextLines:
    """Text queries read from stdin a line at a time (a terminal, or a pipe of plain text):
    one batch per line, so each is answered before the next is read. `first`: lines already
    read (to tell text from records). On a terminal blank lines are skipped and, with
    `prompt`, a prompt goes to stderr before each line."""

    PROMPT = "query> "

    def __init__(self, stream, first=(), terminal=False, prompt=False):
        import pyarrow as pa

        self.schema = pa.schema([pa.field("text", pa.string())])
        self.metadata, self.inputs = {}, ["-"]
        self.stream, self.first = stream, list(first)
        self.terminal = terminal
        self.prompt = prompt and terminal and _isatty(sys_stderr())

    def _lines(self):
        yield from self.first
        while True:
            if self.prompt:
                err = sys_stderr()
                err.write(self.PROMPT)
                err.flush()
            line = self.stream.readline()
            if not line:
                if self.prompt:
                    sys_stderr().write("\n")
                return
            yield line

    def __iter__(self):
        import pyarrow as pa

        from vecpipe.formats.errors import DataError
        from vecpipe.formats.readers import STDIN_NAME, SourceBatch

        for number, raw in enumerate(self._lines(), start=1):
            try:
                text = raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as err:
                raise DataError(f"invalid UTF-8 ({err.reason})", source=STDIN_NAME,
                                record=number) from None
            if self.terminal and not text.strip():
                continue
            yield SourceBatch(pa.record_batch([pa.array([text], pa.string())],
                                              schema=self.schema), STDIN_NAME, number)


def sys_stderr():
    import sys

    return sys.stderr


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


def stdin_queries(inputs, input_format, prompt, **stream_options):
    """The queries on stdin, when they are all the queries: text lines as TextLines (a terminal
    is read as text; a pipe whose first line is none of the record formats too), records as a
    RecordStream; None when the queries come from files."""
    from vecpipe.formats import readers
    from vecpipe.formats.errors import DataError

    if (inputs and list(inputs) != ["-"]) or input_format not in ("auto", "text"):
        return None
    raw = readers.stdin_binary()
    terminal = _isatty(raw)
    if input_format == "text" or terminal:
        return TextLines(raw, terminal=terminal, prompt=prompt)
    head = b""
    while len(head) < readers.SNIFF_BYTES and not head.strip():
        line = raw.readline(readers.SNIFF_BYTES)
        if not line:
            break
        head += line
    if not head:
        return None  # nothing read: the records reader reports the empty input itself
    try:
        fmt = readers.sniff(head)
    except DataError:
        fmt = "text"
    if head.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd")):
        fmt = "compressed"
    if fmt == "text":
        return TextLines(raw, head.splitlines(keepends=True))
    return readers.RecordStream(["-"], input_format, stdin=readers.prepended(head, raw),
                                **stream_options)


class QueryReader:
    """QueryBatches from text records (embedded here, unless the target searches text alone:
    `target.needs_vectors` False) or vector records: float vectors of the query dimension, or
    codes when the stream carries a codec. `keep_texts`: keep every query's text in `texts`
    (None for a vector query), in order."""

    def __init__(self, inputs, target, batch_size, model, prompt, prompt_name, text_fields,
                 device, force, input_format, model_batch_size=32, given=None,
                 keep_texts=False, prompt_line=None, backend="auto"):
        from vecpipe.core.space import input_check
        from vecpipe.formats.errors import UsageError
        from vecpipe.formats.readers import RecordStream

        if given:
            self.stream = GivenQueries(given)
        elif target.source == "-" and (not inputs or "-" in inputs):
            raise UsageError("the searched stream and the queries cannot both come from stdin",
                             hint="name the queries' file, or give --query TEXT")
        else:
            options = dict(batch_rows=batch_size, check=input_check(force), unsniffed="text")
            self.stream = stdin_queries(inputs, input_format, prompt_line, **options) \
                or RecordStream(inputs, input_format, **options)
        self.texts = [] if keep_texts else None
        self.target, self.text_fields, self.force = target, text_fields, force
        self.device, self.backend = device, backend
        self.model_batch_size = model_batch_size
        self.model_spec, self.prompt, self.prompt_name = model, prompt, prompt_name
        self.model = None
        self.codes = False
        self.next_record = 1
        from vecpipe.core.codec import accepted_query_dims
        self.query_dims, self.expected_dims = accepted_query_dims(target.metadata,
                                                                  target.query_dim)
        self._check_schema()

    def _check_schema(self) -> None:
        from vecpipe.core.space import check_same_space
        from vecpipe.formats import schema as names
        from vecpipe.formats.errors import DataError

        schema = self.stream.schema
        if schema is None:
            return
        source = self.stream.inputs[0]
        if getattr(self.target, "fde", None) is not None:
            return self._check_fde_schema(schema, source)
        if names.EMBEDDING in schema.names:
            if not self.target.needs_vectors:
                raise DataError(f"{self.target.source} is searched with text; these queries "
                                "hold vectors", source=source, hint="give text queries")
            meta = self.stream.metadata
            keys = ("model", "codec") if meta.get("codec") else ("model",)
            check_same_space(self.target.metadata, meta, self.target.source, source, keys=keys,
                             force=self.force)
            self.codes = bool(meta.get("codec"))
            if self.model_spec:
                self._load_model()  # -m with vector queries: still checked against the index
        elif all(name in schema.names for name in self.text_fields):
            if self.target.needs_vectors:
                self._load_model()
        else:
            missing = next(name for name in self.text_fields if name not in schema.names)
            raise DataError(f"queries have neither {missing!r} nor 'embedding' (fields: "
                            f"{', '.join(schema.names)})", source=source,
                            hint="name the text field with --text-field")

    def _check_fde_schema(self, schema, source) -> None:
        """An index of FDEs: queries bring token vectors (embed --multi-vector) or text, whose
        token vectors the model makes here; either is encoded as a query FDE."""
        from vecpipe.core.multivector import TOKEN_VECTORS
        from vecpipe.core.space import check_same_space
        from vecpipe.formats.errors import DataError

        if TOKEN_VECTORS in schema.names:
            check_same_space(self.target.metadata, self.stream.metadata, self.target.source,
                             source, keys=("model",), force=self.force)
            self.query_tokens = True
            return
        if not all(name in schema.names for name in self.text_fields):
            raise DataError(f"{self.target.source} holds FDEs of token vectors: queries need "
                            f"{TOKEN_VECTORS!r} or text (fields: {', '.join(schema.names)})",
                            source=source, hint="embed the queries with --multi-vector, or "
                                                "give their text")
        from vecpipe.core.multivector import check_model
        from vecpipe.formats.errors import ParameterError, UsageError

        if self.backend == "auto":  # token vectors come from the torch transformer
            self.backend = "torch"
        self._load_model()
        try:
            check_model(self.model)
        except ParameterError as err:
            raise UsageError("--" + err.message) from None

    def _fde_query(self, item):
        """(query FDEs, each query's token vectors) of a batch, for an index of FDEs."""
        from vecpipe.core.fde import pack_sets
        from vecpipe.core.multivector import read_tokens, token_vectors

        if getattr(self, "query_tokens", False):
            tokens, offsets = read_tokens(item, self.target.query_dim)
            sets = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
            if self.texts is not None:
                self.texts.extend([None] * item.batch.num_rows)
        else:
            texts = self._texts(item)
            if self.texts is not None:
                self.texts.extend(texts)
            sets = token_vectors(self.model, texts, self.model_batch_size, self.prompt_text)
            tokens, offsets = pack_sets(sets)
            if not len(tokens):
                import numpy as np

                tokens = np.zeros((0, self.target.query_dim), np.float32)
        return self.target.fde.encode(tokens, offsets, "query"), sets

    def _load_model(self) -> None:
        """The query model: -m or the one the index records; a different one is refused."""
        from vecpipe.cli.models import load_model, space_options
        from vecpipe.core.space import check_model
        from vecpipe.formats.errors import DataError

        spec = self.model_spec or self.target.metadata.get("model")
        if spec is None:
            raise DataError("records no model, so text queries cannot be embedded",
                            source=self.target.source,
                            hint="pass -m MODEL (the model that made the vectors)")
        self.model = load_model(spec, device=self.device, backend=self.backend,
                                **space_options(self.target.metadata))  # as the documents
        check_model(self.target.metadata, self.model, self.target.source, spec,
                    dim=self.target.query_dim, force=self.force)
        self.prompt_text = self._prompt()

    def _prompt(self) -> str:
        from vecpipe.core.space import role_prompt

        return role_prompt(self.model, "query", self.prompt, self.prompt_name,
                           self.target.query_prompt)

    def __iter__(self):
        for item in self.stream:
            if not item.batch.num_rows:
                continue
            if getattr(self.target, "fde", None) is not None:
                ids = self._ids(item.batch)
                vectors, sets = self._fde_query(item)
                yield QueryBatch(ids, vectors, False, None, sets)
                continue
            yield QueryBatch(self._ids(item.batch), *self._vectors(item))

    def _ids(self, batch) -> list:
        from vecpipe.formats import schema as names

        column = names.find_id_column(batch.schema) or (
            names.QUERY_ID if names.QUERY_ID in batch.schema.names else None)
        first = self.next_record
        self.next_record += batch.num_rows
        return names.batch_ids(batch, column, first, on_null="record").to_pylist()

    def _vectors(self, item):
        import numpy as np

        from vecpipe.formats import schema as names
        from vecpipe.formats.errors import DataError

        batch = item.batch
        if names.EMBEDDING not in batch.schema.names:
            texts = self._texts(item)
            if self.texts is not None:
                self.texts.extend(texts)
            if self.model is None:
                return None, False, texts
            return self.model.encode(texts, batch_size=self.model_batch_size,
                                     prompt=self.prompt_text), False, texts
        if self.texts is not None:
            self.texts.extend([None] * batch.num_rows)
        vectors = names.checked_vectors(item, names.EMBEDDING,
                                        None if self.codes else "query vector")
        if self.codes:
            return self.target.query_codes(vectors, item), True, None
        if vectors.shape[1] not in self.query_dims:
            raise DataError(f"query vectors have {vectors.shape[1]} dimensions, "
                            f"{self.target.source} expects {self.expected_dims}",
                            source=item.source, record=item.first_record)
        return vectors.astype(np.float32), False, None

    def _texts(self, item) -> list:
        """The query texts: the --text-field values joined by a space, as embed joins them."""
        from vecpipe.core.embedding import batch_texts
        from vecpipe.formats.errors import DataError

        texts, problems = batch_texts(item.batch, self.text_fields)
        bad = next((row for row, problem in enumerate(problems) if problem), None)
        if bad is not None:
            raise DataError(f"query has {problems[bad]}", source=item.source,
                            record=item.first_record + bad)
        return texts


def _output_schema(fields_schema):
    import pyarrow as pa

    return pa.schema([pa.field("query_id", pa.string()), pa.field("rank", pa.int32()),
                      pa.field("id", pa.string()), pa.field("score", pa.float32()),
                      *[f for f in fields_schema if f.name != "id"]])


def _requested_fields(fields, all_fields, available) -> list:
    """`id` plus the stored fields to output, checked against what exists."""
    from vecpipe.formats.errors import DataError

    if all_fields:
        return list(available)
    wanted = [name.strip() for name in (fields or "").split(",") if name.strip()]
    missing = [name for name in wanted if name not in available]
    if missing:
        raise DataError(f"--fields {missing[0]}: not stored (stored: {', '.join(available)})",
                        hint="index with --fields FIELD or --all-fields")
    return ["id", *dict.fromkeys(name for name in wanted if name != "id")]


# ---- searching an index folder ----------------------------------------------------------------

OPTION_OF = {"k": "-k", "ef": "--ef", "rescore": "--rescore", "exact": "--exact",
             "threads": "--threads"}


def flagged(err):
    """A core ParameterError worded with the search option that set the parameter."""
    from vecpipe.core.index_search import ENCODE_KEEPING_FULL, KEEP_FULL_VECTORS
    from vecpipe.formats.errors import UsageError

    hint = {KEEP_FULL_VECTORS: "rebuild the index with --keep-vectors",
            ENCODE_KEEPING_FULL: "index the float vectors with --codec FILE --keep-vectors"
            }.get(err.hint, err.hint)
    return UsageError(f"{OPTION_OF[err.parameter]}: {err.message}", source=err.source,
                      hint=hint)


class IndexSearch:
    """Batches of queries against an index folder (memory-mapped), filter evaluated once; one
    core Searcher per depth asked for. A lexical (BM25) index is searched with the query texts
    alone (`needs_vectors` False: no model is loaded). `max_hits`: range search."""

    max_hits = None

    def __init__(self, path, k, exact, ef, rescore, min_score, filter_text, fields, all_fields,
                 threads, like=None, unlike=None, chamfer=False):
        from vecpipe.core.index_open import open_index

        self.index = open_index(path)
        if chamfer and not self.index.metadata.get("fde"):
            from vecpipe.formats.errors import UsageError

            raise UsageError("--rescore chamfer: INDEX is not an index of FDEs (compress "
                             "--fde), so it has no token vectors to score", source=path)
        self.needs_vectors = self.index.layout != "lexical"
        self.source = path
        self.metadata = self.index.metadata
        self.query_prompt = self.index.query_prompt
        self.query_dim = self.index.query_dim
        self.rows = self.index.rows(_requested_fields(fields, all_fields, self.index.fields))
        self.schema = _output_schema(self.rows.schema)
        mask = None
        if filter_text is not None:
            from vecpipe.core.filter_expr import parse

            expression = parse(filter_text)
            expression.check_fields(self.index.fields, "the index")
            mask = expression.mask(self.index.rows(expression.fields))
        self.k = self.depth = k
        self.like, self.like_id = None, None
        if like:
            from vecpipe.core.index_search import LikeQuery

            self.like = LikeQuery(self.index, like, unlike or ())
            self.like_id = like_query_id(like, unlike)
        self.fde, self.tokens, self.chamfer = self._fde(rescore)
        if self.chamfer:  # the FDE search's candidates, rescored by exact Chamfer here
            rescore = None
        self.options = dict(exact=exact, ef=ef, rescore=rescore, min_score=min_score, mask=mask,
                            threads=threads)
        if self.chamfer:
            self.options["min_score"] = None  # applied to the Chamfer scores
        self.min_score = min_score
        self._searchers = {}
        self.searcher(k)  # the options checked now, before any query is read

    def _fde(self, rescore):
        """(the FDE encoder of an index of FDEs, its token store, the --rescore multiple that
        Chamfer rescoring uses) or Nones: an index of compress --fde records."""
        from vecpipe.core.fde import Fde, config_from_meta
        from vecpipe.formats.errors import UsageError

        config = config_from_meta(self.metadata, self.source)
        if config is None:
            return None, None, None
        self.query_dim = config.token_dim  # the queries' token vectors (or text) are encoded
        tokens = None
        if self.index.manifest.get("tokens"):
            from vecpipe.core.multivector import TokenStore

            tokens = TokenStore(self.index.path, self.index.count,
                                self.index.manifest["tokens"]["dim"])
        elif rescore is not None:
            raise UsageError("--rescore: this index of FDEs keeps no token vectors to score "
                             "by exact Chamfer", source=self.source,
                             hint="index the compress --fde output with its token_vectors")
        return Fde(config), tokens, rescore

    def searcher(self, k: int):
        """The core Searcher for k hits per query."""
        from vecpipe.formats.errors import ParameterError

        if k not in self._searchers:
            try:
                self._searchers[k] = self.index.searcher(k, **self.options)
            except ParameterError as err:
                raise flagged(err) from None
        return self._searchers[k]

    def query_codes(self, vectors, item):
        """Query codes made by the index's codec (e.g. `compress --codec`) -> index space."""
        from vecpipe.core.index_format import to_index_codes

        codec = self.index.codec
        return to_index_codes(codec, codec.codes_from_matrix(vectors, source=item.source))

    def hits_for(self, query: QueryBatch, k: int) -> "Hits":
        from vecpipe.formats.errors import ParameterError

        try:
            if self.like is not None:
                return self.like.hits(self.searcher(self.like.searched_k(k)), k)
            if not self.needs_vectors:
                return self.searcher(k).search(query.texts)
            if self.chamfer:
                from vecpipe.core.multivector import chamfer_rescored

                found = self.searcher(k * self.chamfer).search(query.vectors)
                return chamfer_rescored(found, query.tokens, self.tokens, k, self.min_score)
            return self.searcher(k).search(query.vectors, encoded=query.encoded)
        except ParameterError as err:
            raise flagged(err) from None

    def results(self, reader):
        """A ResultBatch (rows: the table whose row i is index row i) per batch of queries;
        with `max_hits`, every hit above the minimum score (range search)."""
        for query in reader:
            yield ResultBatch(query, self._first_hits(query), self.rows)

    def _first_hits(self, query: QueryBatch) -> "Hits":
        if not self.max_hits:
            return self.hits_for(query, self.depth)
        from vecpipe.core.index_search import range_hits

        return range_hits(lambda which, k: self.hits_for(query_subset(query, which), k),
                          len(query.ids), self.options["min_score"], self.max_hits, self.depth)

    def like_results(self):
        """The one result batch of a --like search."""
        query = QueryBatch([self.like_id], None, False, None)
        yield ResultBatch(query, self._first_hits(query), self.rows)


def query_subset(query: QueryBatch, which) -> QueryBatch:
    """The queries numbered `which` (a --like query is one query whatever `which` says)."""
    if query.vectors is None and query.texts is None:
        return query
    vectors = None if query.vectors is None else query.vectors[which]
    texts = None if query.texts is None else [query.texts[i] for i in which]
    tokens = None if query.tokens is None else [query.tokens[i] for i in which]
    return QueryBatch([query.ids[i] for i in which], vectors, query.encoded, texts, tokens)


# ---- hybrid: several indexes, fused ------------------------------------------------------------

HYBRID_REFUSALS = {
    "like": "--like searches with one index's stored vectors; --hybrid fuses query searches",
    "min_score": "--min-score does not apply to --hybrid: the lists fused score on different "
                 "scales",
    "max_hits": "--max-hits does not apply to --hybrid: range search needs one score scale",
    "chamfer": "--rescore chamfer rescores one index of FDEs; --hybrid fuses several lists"}


def _check_hybrid_options(**given) -> None:
    from vecpipe.formats.errors import UsageError

    name = next((name for name, value in given.items() if value), None)
    if name:
        raise UsageError(HYBRID_REFUSALS[name])


def _check_fusion_options(**given) -> None:
    from vecpipe.formats.errors import UsageError

    name = next((name for name, value in given.items() if value), None)
    if name:
        raise UsageError(f"--{name.replace('_', '-')} needs --hybrid IDX: fusion combines the "
                         "lists of several indexes")


class HybridSearch:
    """The same queries against several index folders (dense and lexical), each query's lists
    fused (core/fusion) into hits of the first index's rows: an id another index returns
    must be in the first. Queries are embedded once, with the model of the first dense index;
    every dense index must share it."""

    max_hits, like = None, None

    def __init__(self, paths, k, fusion, list_depth, exact, ef, rescore, filter_text, fields,
                 all_fields, threads):
        self.members = [IndexSearch(path, k, exact if kind else False, ef if kind else None,
                                    rescore if kind else None, None, filter_text, fields,
                                    all_fields, threads)
                        for path, kind in zip(paths, _dense_flags(paths))]
        first = self.members[0]
        self.index, self.rows, self.schema = first.index, first.rows, first.schema
        self.source, self.paths = first.source, list(paths)
        dense = [member for member in self.members if member.needs_vectors]
        self.needs_vectors = bool(dense)
        self.embedder = dense[0] if dense else first
        _check_one_model(dense)
        self.metadata = self.embedder.metadata
        self.query_prompt, self.query_dim = self.embedder.query_prompt, self.embedder.query_dim
        self.fusion, self.list_depth = fusion, list_depth
        self.k = self.depth = k
        self._row_of = None
        self._check_same_ids()

    def _check_same_ids(self) -> None:
        """Every id another index can return is one of the first's (found now, not when a
        query happens to reach it)."""
        import pyarrow.compute as pc

        from vecpipe.formats.errors import DataError

        known = self.rows.column("id").combine_chunks()
        for member in self.members[1:]:
            ids = member.rows.column("id")
            missing = ids.filter(pc.invert(pc.is_in(ids, value_set=known)))
            if len(missing):
                raise DataError(f"{len(missing):,} ids of {member.source} are not in "
                                f"{self.source} (first: {missing[0].as_py()!r}): --hybrid "
                                "indexes must hold the same records", source=self.source,
                                hint="index the same records into each (INDEX may hold more)")

    def described(self) -> str:
        import json

        return json.dumps({**self.fusion.metadata(), "lists": self.paths,
                           "list_depth": self._depth(self.depth)})

    def query_codes(self, vectors, item):
        return self.embedder.query_codes(vectors, item)

    def _depth(self, k: int) -> int:
        return max(self.list_depth or 100, k)

    def hits_for(self, query: QueryBatch, k: int) -> "Hits":
        """The best k fused hits of each query, as rows of the first index."""
        from vecpipe.core.fusion import QueryFusion, ranked

        depth = self._depth(k)
        lists = [self._id_scores(member, member.hits_for(self._query_for(member, query),
                                                         depth))
                 for member in self.members]
        weights = self.fusion.run_weights(len(self.members))
        fused = []
        for at in range(len(query.ids)):
            each = [ranked(found[at]) for found in lists]
            fused.append(QueryFusion(self.fusion, each).top(weights, k))
        return self._hits(fused, k)

    def results(self, reader):
        for query in reader:
            yield ResultBatch(query, self.hits_for(query, self.depth), self.rows)

    def _query_for(self, member, query: QueryBatch) -> QueryBatch:
        from vecpipe.formats.errors import UsageError

        if member.needs_vectors:
            return query
        if query.texts is None or any(text is None for text in query.texts):
            raise UsageError(f"--hybrid: {member.source} is a lexical index: it needs text "
                             "queries, not vectors")
        return query._replace(vectors=None, encoded=False)

    @staticmethod
    def _id_scores(member, hits) -> list:
        """Per query {id: score} of a member's hits (their ids taken in one call)."""
        import numpy as np
        import pyarrow as pa

        found = hits.rows >= 0
        ids = iter(member.rows.column("id").take(pa.array(hits.rows[found])).to_pylist())
        scores = iter(hits.scores[found].astype(np.float64).tolist())
        return [{next(ids): next(scores) for _ in range(count)}
                for count in found.sum(axis=1).tolist()]

    def _hits(self, fused, k: int) -> "Hits":
        import numpy as np

        from vecpipe.core.vectors import Hits

        if self._row_of is None:
            self._row_of = {doc: row for row, doc in
                            enumerate(self.rows.column("id").to_pylist())}
        rows = np.full((len(fused), k), -1, np.int64)
        scores = np.full((len(fused), k), -np.inf, np.float32)
        for at, (docs, values) in enumerate(fused):
            for rank, doc in enumerate(docs):  # every id is INDEX's (_check_same_ids)
                rows[at, rank], scores[at, rank] = self._row_of[doc], values[rank]
        return Hits(rows, scores)


def _dense_flags(paths) -> list:
    """Whether each index folder holds vectors (the HNSW options go to those alone)."""
    from vecpipe.core.index_format import read_manifest

    return [read_manifest(path).get("layout") != "lexical" for path in paths]


def _check_one_model(dense) -> None:
    from vecpipe.formats.errors import UsageError

    models = {member.metadata.get("model") for member in dense}
    if len(models) > 1:
        raise UsageError(f"--hybrid: {dense[0].source} and {dense[1].source} hold vectors of "
                         "different models; one query vector cannot search both",
                         hint="search each and fuse the runs with `vecpipe merge --fuse`")


# ---- exact search over an embeddings stream ---------------------------------------------------

class StreamSearch:
    """Exact search over a stream of embedding records: the queries are read first, then the
    stream is scanned once, keeping the best k per query (memory: queries x k records)."""

    QUERY_CHUNK = 1024
    needs_vectors = True

    def __init__(self, path, k, min_score, filter_text, fields, all_fields, metric):
        import pyarrow as pa

        from vecpipe.formats import schema as names
        from vecpipe.core.codec import codec_from_meta
        from vecpipe.formats.errors import DataError
        from vecpipe.formats.readers import RecordStream

        # sniffed: --input-format names the queries' format
        self.stream = RecordStream([path], batch_rows=STREAM_BLOCK_ROWS)
        self.source = path
        schema = self.stream.schema
        if schema is None:
            raise DataError("empty input: nothing to search", source=path)
        if names.EMBEDDING not in schema.names:
            raise DataError("not an index folder, and it has no 'embedding' field (fields: "
                            f"{', '.join(schema.names)})", source=path)
        self.metadata = self.stream.metadata
        self.codec = codec_from_meta(self.metadata, source=path)
        vector_type = schema.field(names.EMBEDDING).type
        # pq codes and bit planes are scored by the float query's dot product with what they
        # decode to (ADC; the planes' scale-weighted sum), not by hamming
        asymmetric = self.codec is not None and self.codec.scored_decoded
        self.bits = pa.types.is_fixed_size_binary(vector_type) and not asymmetric
        self.metric = _stream_metric(metric or ("ip" if asymmetric else None), self.bits)
        self.k = self.depth = k
        self.min_score = min_score
        self.id_column = names.find_id_column(schema)
        available = [names.ID, *[n for n in schema.names
                                 if n not in (names.EMBEDDING, self.id_column)]]
        self.fields = _requested_fields(fields, all_fields, available)
        self.fields_schema = pa.schema(
            [pa.field(names.ID, pa.string())] + [schema.field(n) for n in self.fields[1:]])
        self.schema = _output_schema(self.fields_schema)
        self.filter = None
        if filter_text is not None:
            from vecpipe.core.filter_expr import parse

            self.filter = parse(filter_text)
            self.filter.check_fields(available, path)
        self.query_prompt = None
        self.query_dim = self.codec.input_dim if self.codec is not None else (
            getattr(vector_type, "list_size", None) or vector_type.byte_width * 8)
        if self.bits and self.codec is None:
            raise DataError("packed bits without a codec: float queries cannot be encoded",
                            source=path, hint="index them, or search the float vectors")

    def query_codes(self, vectors, item):
        from vecpipe.formats.errors import DataError

        raise DataError("query codes are not supported against a stream; give float vectors "
                        "or text", source=item.source, record=item.first_record)

    def hits_for(self, query: QueryBatch, k: int):
        from vecpipe.formats.errors import UsageError

        raise UsageError("an embeddings stream is read once, so it cannot be searched again "
                         "deeper", source=self.source, hint="index it first")

    def results(self, reader):
        """All the queries, then one pass over the stream: one ResultBatch."""
        import numpy as np

        batches = list(reader)
        if not batches:
            return
        ids = [query_id for batch in batches for query_id in batch.ids]
        texts = [text for batch in batches for text in (batch.texts or [None] * len(batch.ids))]
        vectors = np.concatenate([batch.vectors for batch in batches])
        query = QueryBatch(ids, vectors, False, texts if any(texts) else None)
        yield ResultBatch(query, *self._scan(self._query_space(vectors)))

    def _query_space(self, queries):
        """Float queries in the space of the stream's vectors (its codec applied)."""
        if self.codec is None:
            return queries
        return self.codec.encode(queries) if self.bits else self.codec.project(queries)

    def _scan(self, queries):
        """One pass over the stream: (Hits over stream row numbers, their stored fields)."""
        from vecpipe.core.vectors import ExactSearch

        search = ExactSearch(queries, self.depth, self.metric, self.QUERY_CHUNK)
        kept = KeptRows(self.fields_schema, self.fields, self.id_column)
        first_row = 0
        for item in self.stream:
            batch = item.batch
            if not batch.num_rows:
                continue
            vectors = self._stream_vectors(item)
            allowed = self.filter.mask(batch) if self.filter is not None else None
            search.add(vectors, first_row, allowed)
            kept.update(batch, first_row, item.first_record, search.hits().rows)
            first_row += batch.num_rows
        return search.hits().thresholded(self.min_score), kept.lookup()

    def _stream_vectors(self, item):
        from vecpipe.formats import schema as names
        from vecpipe.formats.errors import DataError

        decoded = self.codec is not None and not self.bits
        vectors = names.checked_vectors(item, names.EMBEDDING, None if decoded else "vector")
        if decoded:
            return self.codec.decode(self.codec.codes_from_matrix(vectors, item.source))
        if vectors.shape[1] != self.queries_width():
            raise DataError(f"vectors change dimension to {vectors.shape[1]}",
                            source=item.source, record=item.first_record)
        return vectors

    def queries_width(self) -> int:
        return self.codec.code_width if self.codec is not None and self.bits else (
            self.codec.out_dim if self.codec is not None else self.query_dim)


class KeptRows:
    """The id and fields of the stream rows that are currently hits (memory: queries x k)."""

    def __init__(self, fields_schema, fields, id_column):
        self.fields_schema, self.fields, self.id_column = fields_schema, fields, id_column
        self.parts = []  # (sorted stream row numbers, table of those rows)

    def update(self, batch, first_row, first_record, hit_rows) -> None:
        import numpy as np
        import pyarrow as pa

        live = np.unique(hit_rows[hit_rows >= 0])
        parts = []
        for rows, table in self.parts:
            alive = np.isin(rows, live)
            if alive.any():
                parts.append((rows[alive], table.filter(pa.array(alive))))
        self.parts = parts
        wanted = live[(live >= first_row) & (live < first_row + batch.num_rows)]
        if len(wanted):
            local = pa.array(wanted - first_row)
            columns = [self._ids(batch, first_record).take(local)]
            columns += [batch.column(name).take(local) for name in self.fields[1:]]
            self.parts.append((wanted, pa.Table.from_arrays(columns,
                                                            schema=self.fields_schema)))

    def _ids(self, batch, first_record):
        from vecpipe.formats import schema as names

        return names.batch_ids(batch, self.id_column, first_record, on_null="keep")

    def lookup(self) -> "RowLookup":
        import numpy as np
        import pyarrow as pa

        rows = np.concatenate([rows for rows, _ in self.parts] or [np.zeros(0, np.int64)])
        tables = [table for _, table in self.parts] or [self.fields_schema.empty_table()]
        return RowLookup(rows, pa.concat_tables(tables))


class RowLookup:
    """`take(stream rows)` on a table that holds only some stream rows."""

    def __init__(self, rows, table):
        import numpy as np

        self.order = np.argsort(rows)
        self.sorted_rows = rows[self.order]
        self.table = table

    def take(self, rows):
        import numpy as np
        import pyarrow as pa

        return self.table.take(pa.array(self.order[np.searchsorted(self.sorted_rows, rows)]))


def _stream_metric(metric, bits) -> str:
    from vecpipe.formats.errors import UsageError
    from vecpipe.core.index_format import METRICS

    if metric is None:
        return "hamming" if bits else "cos"
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; use {'|'.join(METRICS)}")
    if (metric == "hamming") != bits:
        raise UsageError("hamming is the metric of packed bits, and packed bits' only one")
    return metric


# ---- output -----------------------------------------------------------------------------------

def hit_tables(results, schema):
    """(table, queries) per result batch: one row per hit, columns as `schema` (the stages'
    extra columns after `score`)."""
    import numpy as np
    import pyarrow as pa

    for batch in results:
        hits, query_ids = batch.hits, batch.query.ids
        found = hits.rows >= 0
        query_index, rank_index = np.nonzero(found)
        stored = batch.rows.take(pa.array(hits.rows[found]))
        columns = [pa.array(np.asarray(query_ids, dtype=object)[query_index], pa.string()),
                   pa.array(rank_index + 1, pa.int32()), stored.column("id"),
                   pa.array(hits.scores[found].astype(np.float32), pa.float32())]
        columns += [pa.array(np.asarray(values)[found], schema.field(name).type)
                    for name, values in (batch.extra or {}).items()]
        columns += [stored.column(name) for name in stored.column_names if name != "id"]
        yield pa.Table.from_arrays(columns, schema=schema), len(query_ids)


def write_hits(results, schema, output, fmt, metadata=None) -> None:
    """`metadata` is read once the first batch is out of the pipeline (a stage may fill it
    then, e.g. with the model it loaded)."""
    import itertools

    from vecpipe.cli import console
    from vecpipe.formats.trec import trec_lines
    from vecpipe.formats.writers import RecordWriter, text_output

    results = iter(results)
    first = next(results, None)
    results = itertools.chain([first] if first is not None else [], results)
    queries = hits = 0
    to_stdout = output in (None, "-")
    if fmt == "trec":
        with text_output(output) as out:
            for table, count in hit_tables(results, schema):
                out.write(trec_lines(_trec_rows(table, (metadata or {}).get("group_by"))))
                hits, queries = hits + table.num_rows, queries + count
                if to_stdout:
                    out.flush()
    else:
        with RecordWriter(output, fmt, schema=schema, metadata=metadata or None) as out:
            for table, count in hit_tables(results, schema):
                out.write_table(table)
                hits, queries = hits + table.num_rows, queries + count
                if to_stdout:  # each batch answered at once (one query a line from stdin)
                    out.flush()
    console.info(console.hits_summary(hits, queries))


def _trec_rows(table, group_by=None):
    """(query id, doc id, rank, score) per hit, or per group when the hits are grouped by the
    field `group_by` (docid: its value, score: the group's)."""
    if group_by is None:
        return zip(*(table.column(name).to_pylist()
                     for name in ("query_id", "id", "rank", "score")))
    from vecpipe.core.grouping import group_lines

    return group_lines(*(table.column(name).to_pylist()
                         for name in ("query_id", group_by, "group_score")))


def write_hit_tables(results, output, texts) -> None:
    """A table per query for people: the query text (its id for a vector query) as a heading,
    then rank, score (3 decimals), id and the stored fields, one line a hit, long values cut
    to the terminal's width (else $COLUMNS or 80). Written (and flushed) query by query."""
    import io
    import shutil
    import sys

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from vecpipe.cli import console
    from vecpipe.formats.writers import text_output

    to_stdout = output in (None, "-")
    terminal = to_stdout and _isatty(sys.stdout)
    width = shutil.get_terminal_size().columns
    buffer = io.StringIO()
    screen = Console(file=buffer, width=width, force_terminal=terminal, no_color=not terminal,
                     highlight=False, emoji=False, markup=False, soft_wrap=False)
    queries = hits = 0
    with text_output(output) as out:
        for batch in results:
            found = batch.hits
            for row, query_id in enumerate(batch.query.ids):
                text = texts[queries] if texts and queries < len(texts) else None
                queries += 1
                keep = found.rows[row] >= 0
                stored = batch.rows.take(found.rows[row][keep])
                scores = found.scores[row][keep]
                extra = {name: _shown(values[row][keep])
                         for name, values in (batch.extra or {}).items()}
                hits += len(scores)
                heading = Text(" ".join((text or str(query_id)).split()), style="bold",
                               no_wrap=True, overflow="ellipsis")
                screen.print(heading)
                columns = [name for name in stored.column_names if name != "id"]
                values = [stored.column(name).to_pylist() for name in ["id", *columns]]
                shown = [f"{score:.3f}" for score in scores]
                table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                              expand=bool(columns))
                table.add_column("rank", justify="right", no_wrap=True,
                                 min_width=max(4, len(str(len(scores)))))
                table.add_column("score", justify="right", no_wrap=True,
                                 min_width=max([5, *map(len, shown)]))
                for name, cells in extra.items():
                    table.add_column(name, justify="right", no_wrap=True)
                ids = [str(value) for value in values[0]]
                table.add_column("id", no_wrap=True, overflow="ellipsis",
                                 min_width=min(max([2, *map(len, ids)]), width // 3))
                for name in columns:  # the stored fields share what is left, cut with "…"
                    table.add_column(name, no_wrap=True, overflow="ellipsis", ratio=1)
                for rank, score in enumerate(shown):
                    cells = [_cell(column[rank]) for column in values]
                    table.add_row(str(rank + 1), score,
                                  *(column[rank] for column in extra.values()), *cells)
                if len(scores):
                    screen.print(table)
                else:
                    screen.print("  no hits")
                screen.print()
                out.write(buffer.getvalue())
                buffer.seek(0)
                buffer.truncate()
                if to_stdout:
                    out.flush()
    console.info(console.hits_summary(hits, queries))


def _shown(values) -> list:
    """An extra column's cells: numbers with 3 decimals, the rest as text."""
    import numpy as np

    values = np.asarray(values)
    if values.dtype.kind == "f":
        return [f"{value:.3f}" for value in values]
    return ["" if value is None else str(value) for value in values.tolist()]


def _cell(value):
    """A stored value on one line of a table cell."""
    from rich.text import Text

    text = "" if value is None else str(value)
    return Text(" ".join(text.split()), no_wrap=True, overflow="ellipsis")
