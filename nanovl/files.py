"""The files of a checkpoint folder, read only from inside it: a name (fixed by nanovl, or taken from an index) must be
a plain file name, and a symlink must point inside the folder (or, in the Hugging Face cache, into its blobs/)."""
import json
from pathlib import Path

from nanovl.errors import NanovlError


def checkpoint_file(folder, name) -> Path:
    """folder/name, refused when name is not a plain file name or the file lies outside the folder."""
    folder = Path(folder)
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise NanovlError(f"{folder}: {name!r} is not a file name in the checkpoint folder: nanovl reads only the "
                          "folder's own files")
    file, root = folder / name, folder.resolve()
    inside = [root] + [root.parent.parent / "blobs"] * (root.parent.name == "snapshots")  # HF cache: snapshots/<rev>/
    if file.is_symlink() and not any(file.resolve().is_relative_to(d) for d in inside):
        raise NanovlError(f"{file} links to {file.resolve()}, outside the checkpoint folder: nanovl reads only the "
                          "folder's own files; copy the file into the folder")
    return file


def read_json(file: Path, default=None) -> dict:
    """A JSON object from a UTF-8 file (default when the file does not exist and default is not None)."""
    if default is not None and not file.is_file():
        return default
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise NanovlError(f"cannot read {file}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") \
            from None
    except ValueError as e:  # JSONDecodeError: the line and column
        raise NanovlError(f"cannot read {file}: not valid JSON ({e})") from None
    except OSError as e:
        raise NanovlError(f"cannot read {file}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise NanovlError(f"{file} must hold a JSON object {{...}}, got a {type(data).__name__}")
    return data
