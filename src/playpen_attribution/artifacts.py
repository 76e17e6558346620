"""Is an artifact whole? Checks by file kind, run on a failed job's inputs (`run_stage`), so that a truncated or
corrupt file (a copy cut short, a full disk, a hand-edited table) is named with what is wrong and how to rebuild
it, instead of a library's traceback from deep inside a reader.

The workflow's own writes are atomic (a temporary name, then a rename: `io.atomic_path`) and Snakemake marks the
outputs of an interrupted job incomplete, so a file the workflow wrote is whole or absent; these checks are for
what came from elsewhere.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

MAX_FILES = 2000  # files checked in one folder (a dataset or a model folder holds a few dozen)


def check_file(path: Path) -> str | None:
    """What is wrong with one file (None if nothing this check can see)."""
    suffix = path.suffix.lower()
    try:
        if path.stat().st_size == 0 and suffix in (".parquet", ".safetensors", ".npz", ".json", ".arrow", ".csv"):
            return "is empty"
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
        elif suffix == ".safetensors":
            return _check_safetensors(path)
        elif suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                if bad:
                    return f"holds a corrupt array ({bad})"
        elif suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".arrow":
            import pyarrow as pa

            with pa.memory_map(str(path)) as source:
                pa.ipc.open_stream(source).read_all()
        elif suffix == ".csv":
            with open(path, "rb") as handle:
                handle.seek(-1, 2)
                if handle.read(1) != b"\n":
                    return "ends in the middle of a line (truncated)"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, struct.error) as err:
        return f"cannot be read as {suffix[1:]} ({type(err).__name__}: {err})"
    except Exception as err:  # pyarrow's ArrowInvalid and the like: a reader's refusal is the diagnosis
        return f"cannot be read as {suffix[1:]} ({type(err).__name__}: {err})"
    return None


def _check_safetensors(path: Path) -> str | None:
    """The header's length, the header itself, and the tensors' byte ranges against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "is shorter than a safetensors header (truncated)"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"is truncated: its header says {length} bytes of metadata, the file holds {size - 8}"
        header = json.loads(handle.read(length))
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"is truncated: its tensors need {8 + length + end} bytes, the file holds {size}"
    return None


def check_artifact(path: str | Path) -> str | None:
    """What is wrong with a file, or with the first broken file of a folder; None if nothing is found."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        problem = check_file(path)
        return f"{path} {problem}" if problem else None
    for count, child in enumerate(sorted(p for p in path.rglob("*") if p.is_file())):
        if count >= MAX_FILES:
            break
        problem = check_file(child)
        if problem:
            return f"{child} {problem}"
    return None


def diagnose_inputs(inputs) -> str | None:
    """For a failed job: the first of its inputs that is not whole, with how to rebuild it (an artifact under
    results/) or replace it (a source the run reads)."""
    for item in inputs:
        problem = check_artifact(item)
        if problem:
            if Path(item).parts[:1] == ("results",):
                return (f"{problem}. It is an artifact of the workflow: rebuild it with `snakemake {item} --force` "
                        f"(or delete it and run the same command again)")
            return f"{problem}. It is a source of the run, not built by the workflow: replace it with a whole copy"
    return None
