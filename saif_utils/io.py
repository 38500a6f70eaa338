"""Atomic writes, content hashing and the user cache directory shared by every stage."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


def cache_root() -> Path:
    """Directory for rebuildable caches (dequantised models, activations): `$SAIF_CACHE_DIR` or ~/.cache/saif."""
    return Path(os.environ.get("SAIF_CACHE_DIR", Path.home() / ".cache" / "saif"))


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large weight files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file_memo(path: str | Path, settle_seconds: float = 2.0) -> str:
    """`sha256_file`, remembered under `cache_root()/file_hashes` while the file's path, size, inode, mtime and ctime
    stay the same (git's index does the same), so an unchanged weight file is hashed once rather than at every load.

    Any write to the file moves its ctime, which forces a rehash. A file changed within `settle_seconds` of being
    hashed is not remembered: a second write inside the clock's granularity could keep the same stamp.
    """
    path = Path(path).resolve()
    info = path.stat()
    stamp = {"path": str(path), "size": info.st_size, "inode": info.st_ino, "mtime_ns": info.st_mtime_ns,
             "ctime_ns": info.st_ctime_ns}
    memo = cache_root() / "file_hashes" / f"{content_hash(str(path))}.json"
    try:
        record = json.loads(memo.read_text())
        if record["stamp"] == stamp:
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    if time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) > settle_seconds * 1e9:
        write_json({"stamp": stamp, "sha256": digest}, memo)
    return digest


def content_hash(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable object (dict keys sorted, sets sorted, anything else as `str`); used
    as cache keys."""
    payload = json.dumps(obj, sort_keys=True, default=_stable_json, ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def _stable_json(value: Any) -> Any:
    """A value JSON cannot write, in a form that is the same in every process: a set's own order follows string
    hashing, which Python seeds per process, so it is sorted."""
    return sorted(value, key=repr) if isinstance(value, (set, frozenset)) else str(value)


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file path to write; it replaces `dest` only if the block finishes without error."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that is renamed onto `dest` once the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj: Any, dest: str | Path) -> Path:
    """Write pretty, key-sorted JSON atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")
    return Path(dest)


def write_table(df: pd.DataFrame, dest: str | Path) -> Path:
    """Write a DataFrame atomically as CSV or parquet, chosen by the file suffix."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        if dest.suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif dest.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            raise ValueError(f"write_table: unsupported suffix {dest.suffix!r} for {dest}; use .csv or .parquet")
    return dest


def save_figure(fig: Any, dest: str | Path) -> Path:
    """Save a matplotlib figure atomically (PNG, 150 dpi)."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=dest.suffix.lstrip(".") or "png")
    return dest


def cached_json_items(folder: str, keys: Sequence[Any], compute: Callable[[list[int]], list[dict]],
                      parse: Callable[[dict], Any]) -> list:
    """One JSON entry per item under `cache_root()/folder`, named by the hash of its key.

    `compute(missing)` returns a JSON dict for each missing item index; `parse(entry)` turns an entry into the value
    or raises/returns None when it is unusable, so a torn or stale entry is recomputed rather than trusted.
    """
    paths = [cache_root() / folder / f"{content_hash(key)}.json" for key in keys]

    def read(path: Path) -> Any:
        try:
            return parse(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    out = [read(path) for path in paths]
    # Items with equal keys (e.g. two conditions that produced the same response) are computed once and share the
    # entry, so a cold run hands on exactly what a warm run will read.
    first_of: dict[Path, int] = {}
    for i, value in enumerate(out):
        if value is None:
            first_of.setdefault(paths[i], i)
    missing = list(first_of.values())
    if missing:
        for i, entry in zip(missing, compute(missing)):
            with atomic_path(paths[i]) as tmp:
                tmp.write_text(json.dumps(entry))
            out[i] = parse(entry)
        for i, value in enumerate(out):
            if value is None:
                out[i] = out[first_of[paths[i]]]
    return out


def cached_json(folder: str, key: Any | None, compute: Callable[[], dict]) -> dict:
    """`compute()`'s JSON dict, cached under `cache_root()/folder` by the hash of `key`; `key=None` computes without
    caching (callers that cannot name the weights the result depends on)."""
    if key is None:
        return compute()
    (entry,) = cached_json_items(folder, [key], lambda _: [compute()], lambda e: e)
    return entry


def cached_frames(folder: str, key: Any, compute: Callable[[], dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """`compute()`'s named DataFrames, stored as parquet under `cache_root()/folder/<hash of key>/` and reused while
    the key (everything the result depends on) is unchanged. A directory only appears once complete."""
    dest = cache_root() / folder / content_hash(key)

    def read() -> dict[str, pd.DataFrame] | None:
        try:
            names = json.loads((dest / "frames.json").read_text())["frames"]
            return {name: pd.read_parquet(dest / f"{name}.parquet") for name in names}
        except (OSError, ValueError, KeyError):
            return None

    if (frames := read()) is not None:
        return frames
    computed = compute()
    with atomic_dir(dest) as tmp:
        for name, df in computed.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "frames.json").write_text(json.dumps({"frames": list(computed), "key": key}, default=str))
    # Return what a warm run will read, so cold and warm runs hand identical frames to what follows.
    return read()


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete the temporary files and folders that `atomic_path` / `atomic_dir` left under `root` when their process
    was killed (SIGKILL skips every `finally`); a temporary of a live process is left alone. Returns what was removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            match = re.fullmatch(r"\..+\.tmp-(\d+)(-.*)?", name)
            if match and not _process_alive(int(match.group(1))):
                path = Path(dirpath) / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).exists()]
    return removed


def _process_alive(pid: int) -> bool:
    """True if a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
