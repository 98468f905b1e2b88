"""torch.compile of a model: each repeated block on its own ("regional"), or whole modules.

Regional compilation is what diffusers' `compile_repeated_blocks` does for models that
declare `_repeated_blocks` (Kandinsky3UNet declares none, so the families name their block
classes here, `BLOCKS`): each block instance is compiled alone, with static shapes and
`fullgraph`, and instances of one class with the same shapes share one compiled graph. For
the full-size Kandinsky 3 UNet that is 72 blocks and 29 graphs at one shape, each a small
part of the one ~4,900-node graph whose capture took most of the whole 3B UNet's compile
time.

Two ways a compiled block silently ran eager before, both handled here:

- Dynamo keeps at most `recompile_limit` (8) compiled graphs per code object, and every
  instance of a block class runs the class's one `forward` code: past 8 distinct shapes the
  rest ran eager. Each block's calls are keyed by the shapes Dynamo guards on (its inputs'
  shapes, strides and dtypes, its weights' shapes, its plain attributes), the distinct keys
  are counted per block class across the process, and Dynamo's limit is raised to the count
  before the call that needs it.
- A block that cannot be captured in one graph (a graph break), or whose compile fails,
  raises (`fullgraph`); the block then runs eager, with one warning naming it and why.

`Regional.summary()` is the one line per model the actors log after warm-up: how many blocks
ran compiled, how many eager, as how many graphs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict

import torch
from torch import nn

log = logging.getLogger(__name__)

REGIONAL = "regional"
WHOLE = "whole"
SCOPES = (REGIONAL, WHOLE)

# The repeated blocks of each model, by class name, as diffusers' `_repeated_blocks` would
# list them (the outermost module of one of these classes is one compiled region).
BLOCKS = {
    # Kandinsky 3 UNet: the down/up blocks' ResNet and attention sub-blocks (no mid block).
    "kandinsky3_unet": ("Kandinsky3ResNetBlock", "Kandinsky3AttentionBlock"),
    # MoVQ decoder (both families): its mid block and up blocks.
    "movq_decoder": ("UNetMidBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"),
    # Kandinsky 2.2 decoder UNet (UNet2DConditionModel): ResNet and attention sub-blocks of
    # its down, mid and up blocks.
    "kandinsky22_unet": ("ResnetBlock2D", "Attention"),
    # KandiSuperRes SR UNet (k3batch.model.superres.sr_unet).
    "sr_unet": ("ResBlock",),
}

# Every (block code, call key) compiled in this process: Dynamo's cache is per code object,
# shared by every instance of a class whichever model it sits in.
_KEYS: dict[object, set] = defaultdict(set)


def inductor_options(settings: dict) -> dict:
    """torch.compile's `options` for Inductor: the `mode`'s own options plus the switches of
    `model.performance.compile` (torch.compile refuses `mode` and `options` together)."""
    import torch._inductor

    mode = settings.get("mode", "default")
    options = dict(torch._inductor.list_mode_options(mode))
    for name in ("conv_1x1_as_mm", "coordinate_descent_tuning"):
        if settings.get(name):
            options[name] = True
    return options


def compile_kwargs(settings: dict, *, fullgraph: bool, dynamic) -> dict:
    backend = settings.get("backend", "inductor")
    kwargs = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
    mode = settings.get("mode", "default")
    if backend == "inductor":
        kwargs["options"] = inductor_options(settings)
    elif mode != "default":  # torch.compile refuses a mode for some backends
        kwargs["mode"] = mode
    return kwargs


def use_cache_dir(settings: dict) -> None:
    """Point Inductor's and Triton's caches at `cache_dir` (read when they first compile)."""
    if settings.get("cache_dir"):
        cache = os.path.abspath(settings["cache_dir"])
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")


def compile_whole(module: nn.Module, settings: dict) -> nn.Module:
    """`module.compile(...)` in place (state dict keys and attributes stay as they are)."""
    use_cache_dir(settings)
    module.compile(
        **compile_kwargs(
            settings, fullgraph=settings.get("fullgraph", False), dynamic=settings.get("dynamic")
        )
    )
    return module


def compile_model(name: str, module: nn.Module, blocks, settings: dict):
    """Compile `module` (called `name` in logs) as `settings["scope"]` says: its blocks one by
    one (regional, the default; `blocks`: a key of `BLOCKS`, or class names), or whole.
    Returns what `summary()` reports on."""
    scope = settings.get("scope", REGIONAL)
    if scope == WHOLE:
        compile_whole(module, settings)
        return Whole(name)
    if scope != REGIONAL:
        raise ValueError(f"compile.scope: one of {', '.join(SCOPES)}, got {scope!r}")
    return Regional(name, module, BLOCKS[blocks] if isinstance(blocks, str) else blocks, settings)


class Whole:
    """A module compiled whole (`compile.scope: whole`)."""

    def __init__(self, name: str):
        self.name = name

    def summary(self) -> str:
        return f"{self.name}: compiled whole (one region; graph breaks split it silently)"

    def restore(self) -> None:
        pass


def repeated_blocks(module: nn.Module, class_names) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of `module` whose class is one of `class_names`, in order."""
    found, inside = [], []
    for name, m in module.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if type(m).__name__ in class_names:
            found.append((name, m))
            inside.append(name + ".")
    return found


class Regional:
    """The repeated blocks of one model, each compiled on its own; see the module's doc."""

    def __init__(self, name: str, module: nn.Module, class_names, settings: dict):
        use_cache_dir(settings)
        self.name = name
        found = repeated_blocks(module, class_names)
        if not found:
            raise ValueError(
                f"{name}: none of the blocks {', '.join(class_names)} found to compile"
            )
        # Static shapes unless asked otherwise: each block sees one shape per job size.
        dynamic = settings.get("dynamic") or False
        kwargs = compile_kwargs(settings, fullgraph=True, dynamic=dynamic)
        self.errors = _errors()
        self.blocks = [Block(self, path, block, kwargs) for path, block in found]

    def new_key(self, code, key) -> None:
        """A call key not seen before for this code: raise Dynamo's limits to fit the count."""
        keys = _KEYS[code]
        keys.add(key)
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        if getattr(config, name) < len(keys):
            setattr(config, name, len(keys))
        total = sum(len(k) for k in _KEYS.values())
        if config.accumulated_recompile_limit < total:
            config.accumulated_recompile_limit = total

    @property
    def recompile_limit(self) -> int:
        config = torch._dynamo.config
        return getattr(config, "recompile_limit", None) or config.cache_size_limit

    def counts(self) -> dict:
        """Blocks by state, and the distinct graphs (call keys) of this model's blocks."""
        states = defaultdict(int)
        for b in self.blocks:
            states[b.state] += 1
        graphs = {(b.code, k) for b in self.blocks for k in b.keys}
        classes = defaultdict(int)
        for b in self.blocks:
            classes[type(b.module).__name__] += 1
        return {
            "blocks": len(self.blocks),
            "compiled": states["compiled"],
            "eager": states["eager"],
            "not_run": states["not run"],
            "graphs": len(graphs),
            "classes": dict(classes),
            "recompile_limit": self.recompile_limit,
            "eager_blocks": {b.path: b.reason for b in self.blocks if b.state == "eager"},
        }

    def summary(self) -> str:
        c = self.counts()
        classes = ", ".join(f"{n} x{k}" for n, k in c["classes"].items())
        line = (
            f"{self.name}: regional compile: {c['compiled']} of {c['blocks']} blocks run "
            f"compiled ({c['graphs']} graphs; {classes}), {c['eager']} eager"
        )
        if c["not_run"]:
            line += f", {c['not_run']} not run yet"
        if c["eager_blocks"]:
            line += " (" + "; ".join(f"{p}: {r}" for p, r in c["eager_blocks"].items()) + ")"
        return line + f"; Dynamo recompile limit {c['recompile_limit']}"

    def restore(self) -> None:
        """Every block back to its eager forward (benchmarks compare on the same modules)."""
        for b in self.blocks:
            b.restore()


def _errors() -> tuple:
    """What a block's first compiled call raises when it cannot run compiled: Dynamo's own
    errors (a graph break under fullgraph, a failed backend compile) and the recompile
    limit's hard failure."""
    from torch._dynamo import exc

    errors = [exc.TorchDynamoException]
    if hasattr(exc, "FailOnRecompileLimitHit"):
        errors.append(exc.FailOnRecompileLimitHit)
    return tuple(errors)


def _key(value):
    """What Dynamo guards on for one argument, with static shapes."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value  # Dynamo specialises plain values
    if isinstance(value, (tuple, list)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return type(value).__name__


def _block_key(module: nn.Module) -> tuple:
    """What tells one instance's graph from another's: weights' shapes and dtypes, and each
    submodule's class and plain attributes (group counts, flags, processors' types)."""
    parts = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        parts.append((name, tuple(t.shape), t.stride(), t.dtype, t.device))
    for name, m in module.named_modules():
        parts.append((name, type(m).__name__))
        for attr, v in vars(m).items():
            if attr.startswith("_"):
                continue
            if v is None or isinstance(v, (bool, int, float, str)):
                parts.append((name, attr, v))
            elif not isinstance(v, (torch.Tensor, nn.Module)):
                parts.append((name, attr, type(v).__name__))
    return tuple(parts)


class Block:
    """One compiled block: its forward replaced by this dispatcher (hooks stay eager)."""

    def __init__(self, owner: Regional, path: str, module: nn.Module, kwargs: dict):
        self.owner, self.path, self.module = owner, path, module
        self.code = type(module).forward.__code__
        self.eager_forward = module.forward
        self.compiled_forward = torch.compile(module.forward, **kwargs)
        self.static = None
        self.keys: set = set()
        self.state = "not run"
        self.reason = None
        module.forward = self

    def __call__(self, *args, **kwargs):
        if self.state == "eager":
            return self.eager_forward(*args, **kwargs)
        if self.static is None:
            self.static = _block_key(self.module)
        key = (self.static, _key(args), _key(kwargs), torch.is_grad_enabled())
        if key not in self.keys:
            self.keys.add(key)
            self.owner.new_key(self.code, key)
        try:
            out = self.compiled_forward(*args, **kwargs)
        except self.owner.errors as e:
            self.state = "eager"
            self.reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            log.warning("%s: block %s runs eager: %s", self.owner.name, self.path, self.reason)
            return self.eager_forward(*args, **kwargs)
        self.state = "compiled"
        return out

    def restore(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward


# ------------------------------------------------------------ portable compile artifacts
def artifacts_file(cache_dir: str, what: dict) -> str:
    """The artifacts file under `cache_dir` for `what` (model, settings, warm-up shape): one
    per torch version and device, as kernels generated for one do not fit another."""
    import hashlib
    import json

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    identity = {"torch": torch.__version__, "device": device, **what}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return os.path.join(os.path.abspath(cache_dir), "artifacts", digest.hexdigest()[:24] + ".bin")


@contextlib.contextmanager
def recording_artifacts():
    """Record only what is compiled inside this block as the artifacts `save_artifacts`
    writes: torch.compiler keeps every artifact of the process, so a second model compiled
    in the same process (a Serve replica's upscaler, an earlier test) would otherwise land in
    this model's file."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        fresh = CacheArtifactManager.with_fresh_cache()
    except (ImportError, AttributeError):  # an older torch: the process-wide record
        fresh = contextlib.nullcontext()
    with fresh:
        yield


def load_artifacts(path: str) -> bool:
    """Load torch.compiler cache artifacts from `path` into this process's caches (before
    compiling); False when there is no file yet."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    info = torch.compiler.load_cache_artifacts(data)
    entries = sum(len(v) for v in info.artifacts.values()) if info is not None else 0
    log.info("compile artifacts: loaded %d entries (%d bytes) from %s", entries, len(data), path)
    return True


def save_artifacts(path: str) -> int:
    """Write what this process compiled as torch.compiler cache artifacts to `path`
    (atomically: actors of a node may race); returns the bytes written (0: nothing)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or saved[1].empty():
        return 0  # nothing compiled to kernels (a backend other than Inductor)
    data, info = saved
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    log.info("compile artifacts: saved %d bytes to %s", len(data), path)
    return len(data)
