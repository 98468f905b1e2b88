"""Golden files (`<case>.npz` + `<case>.json`) and the tiny weights' summary they record."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable

import numpy as np

# Regenerates every golden from the reference checkouts (docs/testing.md says how to get
# them); the test's failure messages name it.
RECORD_COMMAND = "bash scripts/record_goldens.sh /tmp/refs"
REPOSITORIES = {
    "Kandinsky-3": "https://github.com/ai-forever/Kandinsky-3",
    "KandiSuperRes": "https://github.com/ai-forever/KandiSuperRes",
    "kandinsky3-diffusers": "https://github.com/ai-forever/kandinsky3-diffusers",
}


# --------------------------------------------------------------------------- golden files
def save(folder: str, case: str, arrays: dict, meta: dict) -> None:
    """Write `folder/<case>.npz` (compressed) and `folder/<case>.json`."""
    os.makedirs(folder, exist_ok=True)
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in arrays.items()}
    np.savez_compressed(os.path.join(folder, f"{case}.npz"), **arrays)
    meta = dict(
        meta, case=case, arrays={k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}
    )
    with open(os.path.join(folder, f"{case}.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def load(folder: str, case: str) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(os.path.join(folder, f"{case}.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    with open(os.path.join(folder, f"{case}.json")) as f:
        return arrays, json.load(f)


def cases(folder: str) -> list[str]:
    return sorted(n[: -len(".json")] for n in os.listdir(folder) if n.endswith(".json"))


def metadata(repo: str, checkout: str, script: str, settings: dict, weights: dict) -> dict:
    """The sidecar of a golden: where it came from and on what."""
    import torch

    commit = subprocess.run(
        ["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return {
        "reference": {"repository": REPOSITORIES[repo], "commit": commit},
        "script": script,
        "settings": _jsonable(settings),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "weights": weights,
    }


def to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _jsonable(v):
    if dataclasses.is_dataclass(v):
        v = dataclasses.asdict(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# --------------------------------------------------------------------------- weights
# Tiny weights are the same on every build of one machine, but not bit for bit across CPUs:
# torch's CPU random fills (normal_, uniform_) round differently without AVX2 (its scalar
# loops: 1 ulp apart on most values), and every tiny builder draws through them. So a
# golden keeps the exact digest and a summary that tells a rebuilt set from a changed one:
# the tensors' names, dtypes and shapes (and the tokenizer's vocabulary) exactly, and four
# float64 sums over their values, which rounding moves by at most 6e-8 of their scale (one
# ulp of every value, all one way) and a changed builder (a tensor redrawn or rescaled) far
# more; a few single values moved by less than WEIGHTS_RTOL of the scale would pass.
WEIGHTS_RTOL = 1e-6


def weights_summary(named: Iterable[tuple[str, object]], extra: bytes = b"") -> dict:
    """{"sha256": of every (name, dtype, shape, bytes) and `extra`, "layout_sha256": of the
    names, dtypes, shapes and `extra`, "sums": [sum v, sum |v|, sum v^2, sum v * ramp]}
    (the ramp -1..1 over each tensor), over the tensors in name order."""
    exact, layout = hashlib.sha256(extra), hashlib.sha256(extra)
    sums = np.zeros(4)
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        head = f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
        exact.update(head)
        layout.update(head)
        if not t.numel():
            continue
        exact.update(t.reshape(-1).numpy().tobytes())
        v = t.reshape(-1).double().numpy()
        ramp = np.linspace(-1.0, 1.0, v.size)
        sums += [v.sum(), np.abs(v).sum(), (v * v).sum(), (v * ramp).sum()]
    return {"sha256": exact.hexdigest(), "layout_sha256": layout.hexdigest(), "sums": sums.tolist()}


def weights_differ(recorded: dict, now: dict) -> str | None:
    """Why `now` (a `weights_summary`) is not the set `recorded` was; None when it is, bit
    for bit or within float rounding."""
    if now["sha256"] == recorded["sha256"]:
        return None
    if now["layout_sha256"] != recorded["layout_sha256"]:
        return "other tensor names, dtypes or shapes, or another tokenizer vocabulary"
    _, abs_sum, sq_sum, _ = recorded["sums"]
    scales = (abs_sum, abs_sum, sq_sum, abs_sum)
    names = ("sum", "sum |v|", "sum v^2", "ramp sum")
    for what, a, b, scale in zip(names, recorded["sums"], now["sums"], scales, strict=True):
        if abs(a - b) > WEIGHTS_RTOL * scale:
            return f"other values: {what} {b!r}, recorded {a!r}"
    return None


def _flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}{k}/")]
    raise TypeError(f"{prefix}: not a tensor or a mapping of tensors ({type(obj).__name__})")


def file_tensors(root: str, files: Iterable[str]) -> tuple[list, bytes]:
    """(name, tensor) of every tensor in `files` (paths relative to `root`: torch.save
    files and safetensors; names prefixed by the path), and the vocabulary of a
    `tokenizer.json` among them (as bytes)."""
    import torch
    from safetensors.torch import load_file

    named, extra = [], b""
    for rel in sorted(files):
        path = os.path.join(root, rel)
        if os.path.basename(rel) == "tokenizer.json":
            with open(path) as f:
                extra += json.dumps(json.load(f)["model"]["vocab"]).encode()
            continue
        if rel.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, weights_only=True)
        named += _flatten(state, f"{rel}/")
    return named, extra


def file_weights(root: str, files: Iterable[str]) -> dict:
    return weights_summary(*file_tensors(root, files))


def rng_picture(h: int, w: int, seed: int) -> np.ndarray:
    """The checks' random pictures (uint8 HxWx3). The goldens store them: a numpy release may
    change the stream."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
