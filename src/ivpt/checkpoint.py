"""Atomic file writes and the ``save_pretrained`` / ``from_pretrained`` format.

A pretrained folder holds ``config.json`` (the model config, the backbone's identity and, written by ``ivpt train``,
the input normalisation it was trained with) and ``model.safetensors``
(only what training changed: every parameter outside the frozen backbone plus trainable backbone tokens). The
frozen backbone is rebuilt from its name and weight source, so a ViT-B checkpoint is a few MB, not 350.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import socket
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import DataConfig, ModelConfig

__all__ = [
    "CheckpointError",
    "OutputError",
    "RunLock",
    "load_training_state",
    "check_output_folder",
    "check_output_folder_all_ranks",
    "remove_stale_temporaries",
    "atomic_write",
    "atomic_write_text",
    "atomic_torch_save",
    "adapter_state",
    "backbone_fingerprint",
    "backbone_identity",
    "check_backbone",
    "check_finite",
    "non_finite_entries",
    "load_adapter_state",
    "save_pretrained",
    "load_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model as configured; the message says what differs."""


class OutputError(RuntimeError):
    """An output file or folder that cannot be written (permissions, a full disk, an unencodable name)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and make sure a file can be written in it, BEFORE any long work starts;
    raise :class:`OutputError` naming the folder and the fix otherwise."""
    folder = Path(folder)
    try:
        str(folder).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(f"output folder {str(folder)!r} has a name that is not valid UTF-8 (files in it could not "
                          "be written); choose a UTF-8 name") from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {folder} ({exc.strerror or exc}); choose another folder "
                          "or make it writable") from None
    return folder


def check_output_folder_all_ranks(folder: str | Path, info) -> Path:
    """:func:`check_output_folder` on rank 0 of ``info`` (a :class:`ivpt.runtime.DistInfo`), and every rank stops
    with the error if it fails, so no rank goes on into collectives that rank 0 will never join."""
    from . import runtime as R

    problem = None
    if info.is_main:
        try:
            check_output_folder(folder)
        except OutputError as exc:
            problem = exc
    if R.any_true(torch.tensor(problem is not None, device=info.device)):
        raise problem or OutputError(f"rank 0 cannot write to the output folder {folder}")
    return Path(folder)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a process killed inside :func:`atomic_write` left in ``folder``;
    returns them."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class RunLock:
    """Exclusive use of a run folder by one process: ``FOLDER/.lock``, held with ``fcntl.flock`` for the run's life.

    The kernel drops a ``flock`` when its holder exits, however it exits, so the lock of a killed run is stale by
    construction and the next run simply takes it over; the file only names the holder (``pid N on HOST``) for the
    message of a refused one. :meth:`release` deletes the file while still holding it, and :meth:`acquire` retries
    when the file it locked was deleted meanwhile, so two processes never hold locks on different files. A process
    forked from the holder (a DataLoader worker) closes its inherited copy at once and never holds the lock: a
    ``flock`` lives while any copy of its descriptor is open, so orphaned workers of a killed run would otherwise
    keep its folder locked. On a platform or file system without ``flock`` the folder is not locked (one warning)."""

    NAME = ".lock"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`OutputError` naming the folder and its holder; the folder must exist. A lock
        this object already holds stays held (so a holder can hand it to code that acquires it)."""
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX
            logging.getLogger("ivpt").warning(f"cannot lock {self.folder} on this platform (no fcntl): make sure no "
                                              "other run writes into it at the same time")
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {self.path} ({exc.strerror or exc}); choose "
                                  "another folder or make it writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(
                        f"run folder {self.folder} is in use by another ivpt process ({holder or 'holder unknown'}; "
                        f"lock {self.path}); wait for it to finish or stop it, or choose another folder") from None
                logging.getLogger("ivpt").warning(f"cannot lock {self.folder} ({exc.strerror or exc}): make sure no "
                                                  "other run writes into it at the same time")
                return self
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and deleted the file between our open and flock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        _HELD_LOCKS.add(self)
        return self

    def release(self) -> None:
        """Delete the lock file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD_LOCKS.discard(self)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)  # drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the kernel drops the lock; the file, naming a dead holder, is taken over later


_HELD_LOCKS: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a freshly forked child: close the copies of the parent's lock descriptors without unlocking or deleting
    anything, so the lock dies with the parent however the parent dies."""
    for lock in list(_HELD_LOCKS):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` and rename it into place, so a crash never
    leaves a half-written file under the final name. The file gets the permissions the umask gives a new file
    (not ``mkstemp``'s 0600); a failed write (full disk, permissions) is an :class:`OutputError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot write {path} ({type(exc).__name__}: {exc}); check the free space and the "
                          f"permissions of {path.parent}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def _numpy_globals() -> list:
    """What ``np.random.get_state()``'s array needs to unpickle (a last.pt written before RNG states were stored as
    tensors): the array reconstructor, the array and dtype types; nothing that can call other code."""
    import numpy as np

    allowed: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reconstruct = __import__(module, fromlist=["_reconstruct"])._reconstruct
        except (ImportError, AttributeError):
            continue
        for name in ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"):
            allowed.append((reconstruct, name))
        break
    return allowed


def load_training_state(path: str | Path) -> Any:
    """``torch.load`` of a training checkpoint (last.pt) with ``weights_only=True``: tensors and plain values only,
    plus the numpy RNG array of files written by earlier versions. A file that needs any other Python object is
    refused, naming those objects, since unpickling them could run code; an unreadable one is a
    :class:`CheckpointError` too."""
    path = Path(path)
    allowed = torch.serialization.safe_globals(_numpy_globals())
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "Unsupported operand" in str(exc):
            try:
                with allowed:
                    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # a damaged archive: the unpickler's own words must do
                names = []
            what = ", ".join(names) if names else str(exc).split("WeightsUnpickler error: ")[-1].split(" was ")[0]
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain values ({what}); it is not loaded, since "
                "unpickling them could run code. A last.pt written by `ivpt train` holds none: use a file you trust"
            ) from None
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # truncated or foreign files fail in many ways
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers that training can change: all outside ``backbone.`` plus trainable backbone ones."""
    state = {}
    for name, p in model.named_parameters():
        if not name.startswith("backbone.") or p.requires_grad:
            state[name] = p.detach()
    for name, b in model.named_buffers():
        if not name.startswith("backbone."):
            state[name] = b.detach()
    return state


def backbone_fingerprint(model: nn.Module) -> str:
    """A short hash of a few frozen backbone tensors: cheap, and enough to notice other backbone weights."""
    h = hashlib.sha256()
    frozen = [(n, p) for n, p in model.named_parameters() if n.startswith("backbone.") and not p.requires_grad]
    for name, p in frozen[:4] + frozen[-2:]:
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_identity(model: nn.Module) -> dict[str, str]:
    """{name, weights (as configured), source (what they resolved to), fingerprint} of ``model``'s backbone."""
    return {"name": model.cfg.backbone, "weights": model.cfg.weights,
            "source": str(getattr(model.backbone, "weights_source", model.cfg.weights)),
            "fingerprint": backbone_fingerprint(model)}


def check_backbone(model: nn.Module, saved: dict | None, where: str | Path, *, allow_mismatch: bool = False) -> None:
    """Refuse to load ``where`` (trained on the backbone ``saved`` describes) into ``model`` when their frozen
    backbone weights differ, naming both sources; ``allow_mismatch`` turns the refusal into a warning."""
    fingerprint = (saved or {}).get("fingerprint")
    mine = backbone_identity(model)
    if not fingerprint or fingerprint == mine["fingerprint"]:
        return
    trained_on = saved.get("source") or saved.get("weights", "?")
    message = (
        f"{where} was trained on other backbone weights: {saved.get('name', '?')} from {trained_on!r} "
        f"(fingerprint {fingerprint}), but this model's backbone came from {mine['source']!r} "
        f"(model.weights={mine['weights']!r}, fingerprint {mine['fingerprint']}). Give the original weights "
        f"(model.weights=... or --weights ...)"
    )
    if not allow_mismatch:
        raise CheckpointError(message + ", or allow the mismatch explicitly (--allow-backbone-mismatch)")
    warnings.warn(message + "; loading anyway because the mismatch was allowed, results will differ",
                  stacklevel=2)


def check_state(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], where: str | Path) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped entry of ``loaded``."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(loaded) & set(expected))
        if loaded[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {where} does not match the model:"]
        if missing:
            lines.append(f"  missing from checkpoint: {', '.join(missing)}")
        if unexpected:
            lines.append(f"  not in model: {', '.join(unexpected)}")
        if shapes:
            lines.append("  shape mismatch: " + "; ".join(shapes))
        lines.append("  (was it saved with another config? compare model.n_pro, num_classes, backbone, img_size)")
        raise CheckpointError("\n".join(lines))


def non_finite_entries(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` with a NaN or infinite entry (one host sync)."""
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    flags = [torch.isfinite(state[k]).all() for k in names]
    flags = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [k for k, ok in zip(names, flags) if not ok]


def check_finite(state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the entries of ``state`` with non-finite values: such a checkpoint was
    saved after training diverged and would only ever predict garbage."""
    bad = non_finite_entries(state)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{where} holds non-finite values in {', '.join(bad[:5])}{more}; it was saved after "
                              "training diverged: use an earlier checkpoint, or train again with lower learning rates")


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Load trained parameters strictly: every entry of :func:`adapter_state` and nothing else, shapes equal, every
    value finite."""
    check_state(adapter_state(model), state, where)
    check_finite(state, where)
    model.load_state_dict(state, strict=False)  # the frozen backbone is not in ``state``, by design


# The data fields a checkpoint keeps beside its model (config.json "data"): how its input images were normalised,
# so that a pretrained folder alone is read as it was trained (ivpt.runs.run_config).
SAVED_DATA_FIELDS = ("mean", "std")


def save_pretrained(model: nn.Module, directory: str | Path, *, extra: dict | None = None,
                    data: DataConfig | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for ``model`` (which has a ``cfg: ModelConfig``); ``data``: the
    run's data section, whose :data:`SAVED_DATA_FIELDS` (the input normalisation) are kept as ``"data"``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu().contiguous() for k, v in adapter_state(model).items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.cfg),
        "backbone": backbone_identity(model),
        **({"data": {k: list(getattr(data, k)) for k in SAVED_DATA_FIELDS}} if data is not None else {}),
        **(extra or {}),
    }
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2))
    return directory


def read_pretrained_config(directory: str | Path) -> tuple[ModelConfig, dict]:
    """(model config, whole config.json) of a pretrained folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a pretrained folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    from .config import Config, ConfigError, saved_config

    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from the run that wrote it "
                              "(save_pretrained writes it)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' section; it was not written by save_pretrained")
    meta = saved_config(meta)  # written by an earlier ivpt: the fields it predates as it was trained
    try:
        model = Config.from_dict({"model": meta["model"]}).model
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return model, meta


def load_pretrained(model: nn.Module, directory: str | Path, *, meta: dict | None = None,
                    allow_backbone_mismatch: bool = False) -> nn.Module:
    """Load ``model.safetensors`` from ``directory`` into ``model``, refusing any name or shape mismatch and (when
    ``meta``, the folder's config.json, is given) backbone weights other than those it was trained on."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    if meta is not None:
        check_backbone(model, meta.get("backbone"), directory, allow_mismatch=allow_backbone_mismatch)
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc}); it is truncated or not a "
                              "safetensors file, restore it from the run that wrote it") from None
    load_adapter_state(model, state, path)
    return model
