"""Part files of a sharded job: `DIR/part-0000I-of-0000N.<ext>` plus a small sidecar.

The sidecar (`.<part>.done.json`) is written after the part is renamed into place. It records
the part's rows, bytes and sha256, and the job that made it: the inputs' contents (size, mtime,
sha256) and every option that changes the output. A rerun skips a part only when the file still
matches its sidecar and the job is this run's; otherwise it says why and makes the part again,
so a corpus that grew or a changed `--dim` never leaves stale parts behind. A part made from
stdin is always made again: stdin cannot be compared before it is read. While a run makes a
part it holds a lock (`.<part>.lock`), so the next run removes the temporaries of a run that
died, and never those of one still running.
"""
from __future__ import annotations

import hashlib
import json
import os

from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.shards import Shard, parse_part_name
from vecpipe.formats.writers import AtomicFile, resolve_output_format

EXTENSIONS = {"arrow-file": "arrow", "arrow": "arrows", "parquet": "parquet", "jsonl": "jsonl"}
UNRECORDED = "it has no record of its inputs and options (made by an older vecpipe)"


def wants_part_folder(output: str | None) -> bool:
    """`-o DIR/` or an existing folder: write part files into it."""
    return output is not None and (output.endswith(os.sep) or os.path.isdir(output))


def part_path(folder: str, shard: Shard, output_format: str = "auto") -> tuple[str, str]:
    """(path, resolved format) of a shard's part file; `auto` means an Arrow file."""
    fmt = "arrow-file" if output_format == "auto" else output_format
    if fmt not in EXTENSIONS:
        raise UsageError(f"part files cannot be {fmt!r}; use arrow-file, arrow, parquet or jsonl")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, shard.part_name(EXTENSIONS[fmt]))
    return path, resolve_output_format(path, fmt)


def shard_output(output: str | None, shard: Shard | None, output_format: str = "auto",
                 hint: str | None = None) -> tuple[str, str] | None:
    """(part file, format) for `--shard I/N -o DIR/`; None when -o is not a folder. A folder
    without --shard is a usage error (`hint` says what else the command accepts)."""
    if not wants_part_folder(output):
        return None
    if shard is None:
        raise UsageError(f"-o {output} is a folder: part files need --shard I/N", hint=hint)
    return part_path(output, shard, output_format)


def _hidden(path: str, suffix: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{suffix}")


def _sidecar(path: str) -> str:
    return _hidden(path, "done.json")


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- what a part is made from -----------------------------------------------------------------

_facts_cache: dict[tuple, dict] = {}  # a process hashes an unchanged input once (Ray workers)


def content_facts(path: str, skip: tuple = ()) -> dict:
    """size, mtime_ns and sha256 of a file, or of a folder's files (hidden entries and the
    subfolders named in `skip` left out; the names inside the folder count)."""
    if not os.path.isdir(path):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise DataError("no such file", source=path) from None
        # ctime too: a write that restores size and mtime still moves it
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
               stat.st_ino)
        if key not in _facts_cache:
            _facts_cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                 "sha256": file_sha256(path)}
        return dict(_facts_cache[key])
    h, size, mtime = hashlib.sha256(), 0, 0
    for root, folders, files in os.walk(path):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in skip)
        for name in sorted(f for f in files if not f.startswith(".")):
            facts = content_facts(os.path.join(root, name))
            relative = os.path.relpath(os.path.join(root, name), path)
            h.update(f"{relative}\0{facts['size']}\0{facts['sha256']}\n".encode())
            size, mtime = size + facts["size"], max(mtime, facts["mtime_ns"])
    return {"size": size, "mtime_ns": mtime, "sha256": h.hexdigest()}


class Job:
    """What a part is made from: the contents of its inputs (`-` is stdin) and the options that
    change its output (`options`: flag -> value; the command decides which flags count)."""

    def __init__(self, inputs: list[str], options: dict, shard: Shard):
        self.stdin = "-" in inputs
        self.inputs = [] if self.stdin else [dict(name=p, **content_facts(p)) for p in inputs]
        self.options = json.loads(json.dumps(options))  # as a marker holds them
        self.shard = shard

    @property
    def digest(self) -> str:
        """The same for every part of one job (names of inputs aside): merge compares it."""
        key = {"inputs": "stdin" if self.stdin else
               [[given["size"], given["sha256"]] for given in self.inputs],
               "options": self.options, "shards": self.shard.count}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def record(self) -> dict:
        return {"inputs": "stdin" if self.stdin else self.inputs, "options": self.options,
                "shard": f"{self.shard.index}/{self.shard.count}", "digest": self.digest}

    def change_since(self, recorded: dict | None) -> str | None:
        """Why a part made by the `recorded` job is not this job's part; None when it is."""
        if recorded is None:
            return UNRECORDED
        if self.stdin:
            return "the input is stdin, which cannot be compared before it is read"
        return _difference(recorded, self.record())

    def check_unchanged(self) -> None:
        """Fail when an input changed while it was being read: the part mixes two versions."""
        for given in self.inputs:
            stat = os.stat(given["name"]) if os.path.exists(given["name"]) else None
            if os.path.isdir(given["name"]):
                now = content_facts(given["name"])
                changed = now["sha256"] != given["sha256"]
            else:
                changed = stat is None or (stat.st_size, stat.st_mtime_ns) != \
                    (given["size"], given["mtime_ns"])
            if changed:
                raise DataError("changed while it was being read: the part is not kept",
                                source=given["name"], hint="rerun once the input is final")


def _difference(old: dict, new: dict) -> str | None:
    """One line: the first input, or the options, that differ between two recorded jobs."""
    if "--append" in old["options"] and "--append" not in new["options"]:
        return "it was extended with --append since it was built"
    if (old["inputs"] == "stdin") != (new["inputs"] == "stdin"):
        return "it was made from stdin" if old["inputs"] == "stdin" else \
            "it was made from files, this run reads stdin"
    if old["inputs"] != "stdin":
        if len(old["inputs"]) != len(new["inputs"]):
            return f"the inputs changed ({len(new['inputs'])} now, {len(old['inputs'])} before)"
        for was, now in zip(old["inputs"], new["inputs"]):
            if was["size"] != now["size"]:
                return f"input {now['name']} changed ({was['size']:,} -> {now['size']:,} bytes)"
            if was["sha256"] != now["sha256"]:
                return f"input {now['name']} changed (same size, other content)"
    before, after = old["options"], new["options"]
    was, now = sorted(set(before) - set(after) - {"--append"}), \
        sorted(set(after) - set(before) - {"--append"})
    if was or now:  # a command's counted options are fixed: another version renamed some
        return (f"it was made by another vecpipe version, which records other options "
                f"({', '.join(was) or 'none'} -> {', '.join(now) or 'none'})")
    changed = [flag for flag in sorted(set(before) | set(after))
               if before.get(flag) != after.get(flag)]
    return "; ".join(f"{flag} changed ({_shown(before.get(flag))} -> {_shown(after.get(flag))})"
                     for flag in changed) or None


def _shown(value) -> str:
    text = "none" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


# -- part files -------------------------------------------------------------------------------

def _read_marker(path: str) -> dict | None:
    try:
        with open(_sidecar(path), encoding="utf-8") as f:
            facts = json.load(f)
        return facts if isinstance(facts, dict) else None
    except (OSError, ValueError):
        return None


def _intact(path: str, facts: dict) -> bool:
    try:
        return os.path.getsize(path) == facts["bytes"] and file_sha256(path) == facts["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def mark_complete(path: str, rows: int, job: Job | None = None) -> None:
    """Record that `path` is a finished part (call after the part file is in place)."""
    facts = {"rows": rows, "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    if job is not None:
        facts["job"] = job.record()
    _write_marker(path, facts)


def _write_marker(path: str, facts: dict) -> None:
    out = AtomicFile(_sidecar(path))
    out.file.write(json.dumps(facts).encode())
    out.commit()


def _forget(path: str) -> None:
    try:
        os.unlink(_sidecar(path))
    except FileNotFoundError:
        pass


def completed_rows(path: str) -> int | None:
    """Rows of a complete part (whatever job made it), or None when it is missing, unfinished
    or altered."""
    facts = _read_marker(path)
    if facts is None or not _intact(path, facts):
        return None
    try:
        return int(facts["rows"])
    except (KeyError, TypeError, ValueError):
        return None


def part_status(path: str, job: Job) -> tuple[int | None, str | None]:
    """(rows, None) when `path` is complete and made by `job`; else (None, why it must be made
    again), why being None when there is nothing yet (no part, or a run that never finished)."""
    facts = _read_marker(path)
    if facts is None:
        return None, None
    if not _intact(path, facts):
        return None, "it changed since it was completed" if os.path.exists(path) else None
    why = job.change_since(facts.get("job"))
    return (None, why) if why else (int(facts["rows"]), None)


class PartClaim:
    """One run's hold on a part file (use as a context manager): the lock, the removal of a
    dead run's temporaries, and whether the part is already complete for this job.

    `rows` is set when it is (skip it); else `reason` says why the part is made again (None
    for a first run) and `removed` names the temporaries of a dead run that were deleted.
    """

    def __init__(self, path: str, job: Job):
        self.path, self.job = path, job
        self._lock = _Lock(path)
        try:
            self.removed = _remove_temporaries(path)
            self.rows, self.reason = part_status(path, job)
            if self.rows is None:
                _forget(path)  # the old sidecar must not vouch for the file this run writes
        except BaseException:
            self._lock.release()
            raise

    def notes(self) -> list[str]:
        """Lines for stderr: the dead run's temporaries removed, why the part is made again."""
        notes = []
        if self.removed:
            notes.append(f"removed {', '.join(self.removed)}: left by a run that did not finish")
        if self.reason:
            notes.append(f"{self.path}: {self.reason}: making it again")
        return notes

    def finish(self, rows: int) -> None:
        """Mark the part complete; drop it instead when an input changed while it was read."""
        try:
            self.job.check_unchanged()
        except DataError:
            os.unlink(self.path)
            raise
        mark_complete(self.path, rows, self.job)

    def __enter__(self) -> "PartClaim":
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


class _Lock:
    """An exclusive lock on `.<part>.lock` (POSIX record locks: they also work over NFS),
    removed on release. Fails at once when another run holds it."""

    def __init__(self, part: str):
        import fcntl

        self.path = _hidden(part, "lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise DataError("another run is making this part now", source=part,
                                hint="wait for it to finish, or stop it first") from None
            if _is_file_at(fd, self.path):
                self.fd = fd
                return
            os.close(fd)  # its holder removed it as we locked it: lock the next one

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiting run then locks a new file
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _is_file_at(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _remove_temporaries(path: str) -> list[str]:
    """Delete the part's and its sidecar's temporary files (AtomicFile's `.<name>.*.tmp`),
    left by a run that died: only called with the part's lock held."""
    folder, name = os.path.split(path)
    prefixes = (f".{name}.", f"..{name}.done.json.")
    removed = []
    for entry in os.listdir(folder or "."):
        if entry.startswith(prefixes) and entry.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, entry))
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


# -- parts that are folders (index shards) ----------------------------------------------------

def folder_part_status(path: str, job: Job, manifest: str, intact: bool) -> tuple[bool, str | None]:
    """Whether the folder part `path` (built elsewhere and renamed into place, as an index is)
    is complete and made by `job`; else why not (None: nothing to compare with).

    Its sidecar is written before a build starts (`start_folder_part`), naming the job and the
    manifest the folder held then; the build has finished when the folder holds an intact one
    with another manifest (each new manifest records its creation time). The first check after
    that records the new manifest as the part's.
    """
    facts = _read_marker(path)
    if not intact:
        return False, "it changed since it was built" if facts and os.path.isdir(path) else None
    if facts is None or "job" not in facts:
        return False, UNRECORDED
    current = file_sha256(manifest)
    if "building_over" in facts:
        if current == facts["building_over"]:
            return False, "its last build did not finish"
        facts = {"job": facts["job"], "manifest": os.path.basename(manifest),
                 "manifest_sha256": current}
        _write_marker(path, facts)
    elif current != facts.get("manifest_sha256"):
        return False, "it changed since it was built"
    why = job.change_since(facts["job"])
    return (False, why) if why else (True, None)


def start_folder_part(path: str, job: Job, manifest: str) -> None:
    """Record, before building the folder part `path`, the job, the name of the folder's
    manifest file (`manifest` is its path) and the manifest it replaces."""
    before = file_sha256(manifest) if os.path.isfile(manifest) else None
    _write_marker(path, {"job": job.record(), "manifest": os.path.basename(manifest),
                         "building_over": before})


def folder_part_job(path: str) -> str | None:
    """The digest of the job that made a folder part (None: unknown, or not finished)."""
    return (_made_by(path) or {}).get("digest")


def _made_by(path: str) -> dict | None:
    """The recorded job that made the part `path` (a file, or an index folder); None when no
    sidecar says so, the part changed since, or its build never finished."""
    facts = _read_marker(path)
    if facts is None or not isinstance(facts.get("job"), dict):
        return None
    if not os.path.isdir(path):
        return facts["job"] if _intact(path, facts) else None
    name = facts.get("manifest")
    if not isinstance(name, str) or name in ("", ".", "..") or name != os.path.basename(name):
        return None  # an older vecpipe's sidecar, or one naming no file of the folder
    try:
        current = file_sha256(os.path.join(path, name))
    except OSError:
        return None
    if "building_over" in facts:
        return facts["job"] if current != facts["building_over"] else None
    return facts["job"] if current == facts.get("manifest_sha256") else None


# -- sets of parts ----------------------------------------------------------------------------

def list_parts(folder: str) -> list[tuple[Shard, str]]:
    """The part files in a folder, sorted by shard index (sidecars and temporaries ignored)."""
    found = []
    for name in sorted(os.listdir(folder)):
        shard = parse_part_name(name)
        if shard is not None and not name.startswith("."):
            found.append((shard, os.path.join(folder, name)))
    return sorted(found)


def check_one_job(paths: list[str]) -> None:
    """Refuse to combine part files made by different jobs (other inputs or options), or a part
    not marked complete among marked ones: merging them would mix old and new parts. Works for
    part files and index part folders. When no part names its job (`--shard I/N -o FILE`, or
    parts of an older vecpipe) nothing is checked."""
    marked, unmarked = {}, []
    for path in paths:
        if parse_part_name(path) is None:
            continue
        job = _made_by(path)
        if job is None:
            unmarked.append(path)
        else:
            marked[path] = job
    if not marked:
        return
    if unmarked:
        raise DataError("is not marked complete (its run did not finish, it changed since, or "
                        "an older vecpipe made it)", source=unmarked[0],
                        hint="rerun its shard with the same command as the other parts")
    first, first_job = next(iter(marked.items()))
    for path, job in marked.items():
        if job.get("digest") != first_job.get("digest"):
            why = _difference(first_job, job) or "their jobs differ"
            raise DataError(f"was made by another job than {os.path.basename(first)} ({why})",
                            source=path, hint="rerun every shard with one command: parts whose "
                                              "inputs or options changed are made again")
