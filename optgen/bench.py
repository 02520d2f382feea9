"""``optgen bench``: optimizer step time of optgen against its peers, measured interleaved in one process.

Parameter sets are built from the tensor shapes of known architectures (shape recipes: nothing is
downloaded) or ``synthetic:N``. For each optimizer every implementation gets the same parameters and
gradients; the implementations take turns, one timed sample each per round (round-robin, the order rotated
every round), so a machine whose speed drifts (other processes, clocks) slows them alike. A row reports the
median step time and the spread (25th-75th percentile), the effective bandwidth at the optgen plan's bytes
per parameter (the least traffic the update needs, the same for every row of an optimizer), that bandwidth
as a share of a measured device-to-device copy, the first step (state creation, compilation) and the host
time per step. Timing: ``time.perf_counter`` on CPU; CUDA events on GPU (host time: the ``step()`` call
without synchronising).

A peer that cannot run here (not installed, no GPU, unsupported) is listed as skipped with the reason.
Benchmarks, not tests: nothing here asserts a duration.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from . import quantization
from .catalog import resolve_spec

# -- parameter sets -------------------------------------------------------------------------------------


def _bert_layer(h: int, inter: int, prefix: str) -> list[tuple[str, tuple]]:
    return [
        (f"{prefix}.attention.self.query.weight", (h, h)),
        (f"{prefix}.attention.self.query.bias", (h,)),
        (f"{prefix}.attention.self.key.weight", (h, h)),
        (f"{prefix}.attention.self.key.bias", (h,)),
        (f"{prefix}.attention.self.value.weight", (h, h)),
        (f"{prefix}.attention.self.value.bias", (h,)),
        (f"{prefix}.attention.output.dense.weight", (h, h)),
        (f"{prefix}.attention.output.dense.bias", (h,)),
        (f"{prefix}.attention.output.LayerNorm.weight", (h,)),
        (f"{prefix}.attention.output.LayerNorm.bias", (h,)),
        (f"{prefix}.intermediate.dense.weight", (inter, h)),
        (f"{prefix}.intermediate.dense.bias", (inter,)),
        (f"{prefix}.output.dense.weight", (h, inter)),
        (f"{prefix}.output.dense.bias", (h,)),
        (f"{prefix}.output.LayerNorm.weight", (h,)),
        (f"{prefix}.output.LayerNorm.bias", (h,)),
    ]


def _bert(layers: int, h: int, vocab: int, pooler: bool = True) -> list[tuple[str, tuple]]:
    shapes = [
        ("embeddings.word_embeddings.weight", (vocab, h)),
        ("embeddings.position_embeddings.weight", (512, h)),
        ("embeddings.token_type_embeddings.weight", (2, h)),
        ("embeddings.LayerNorm.weight", (h,)),
        ("embeddings.LayerNorm.bias", (h,)),
    ]
    for i in range(layers):
        shapes += _bert_layer(h, 4 * h, f"encoder.layer.{i}")
    if pooler:
        shapes += [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
    return shapes


def bert_base_like() -> list[tuple[str, tuple]]:
    """The issue's "BERT-base-like" set: 100 tensors, 49.2M parameters -- BERT-base's hidden size (768),
    6 of its encoder layers, an 8192-token word embedding, positions and the embedding LayerNorm."""
    shapes = [
        ("embeddings.word_embeddings.weight", (8192, 768)),
        ("embeddings.position_embeddings.weight", (512, 768)),
        ("embeddings.LayerNorm.weight", (768,)),
        ("embeddings.LayerNorm.bias", (768,)),
    ]
    for i in range(6):
        shapes += _bert_layer(768, 3072, f"encoder.layer.{i}")
    return shapes


def vit_b32() -> list[tuple[str, tuple]]:
    """ViT-B/32 (torchvision vit_b_32): 88.2M parameters."""
    h, mlp = 768, 3072
    shapes = [
        ("class_token", (1, 1, h)),
        ("conv_proj.weight", (h, 3, 32, 32)),
        ("conv_proj.bias", (h,)),
        ("encoder.pos_embedding", (1, 50, h)),
    ]
    for i in range(12):
        p = f"encoder.layers.encoder_layer_{i}"
        shapes += [
            (f"{p}.ln_1.weight", (h,)),
            (f"{p}.ln_1.bias", (h,)),
            (f"{p}.self_attention.in_proj_weight", (3 * h, h)),
            (f"{p}.self_attention.in_proj_bias", (3 * h,)),
            (f"{p}.self_attention.out_proj.weight", (h, h)),
            (f"{p}.self_attention.out_proj.bias", (h,)),
            (f"{p}.ln_2.weight", (h,)),
            (f"{p}.ln_2.bias", (h,)),
            (f"{p}.mlp.0.weight", (mlp, h)),
            (f"{p}.mlp.0.bias", (mlp,)),
            (f"{p}.mlp.3.weight", (h, mlp)),
            (f"{p}.mlp.3.bias", (h,)),
        ]
    shapes += [("encoder.ln.weight", (h,)), ("encoder.ln.bias", (h,))]
    shapes += [("heads.head.weight", (1000, h)), ("heads.head.bias", (1000,))]
    return shapes


def resnet50() -> list[tuple[str, tuple]]:
    """ResNet-50 (torchvision resnet50): 25.6M parameters in 161 tensors (BatchNorm weights and biases)."""
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            shapes += [
                (f"{p}.conv1.weight", (planes, inplanes, 1, 1)),
                (f"{p}.bn1.weight", (planes,)),
                (f"{p}.bn1.bias", (planes,)),
                (f"{p}.conv2.weight", (planes, planes, 3, 3)),
                (f"{p}.bn2.weight", (planes,)),
                (f"{p}.bn2.bias", (planes,)),
                (f"{p}.conv3.weight", (planes * 4, planes, 1, 1)),
                (f"{p}.bn3.weight", (planes * 4,)),
                (f"{p}.bn3.bias", (planes * 4,)),
            ]
            if b == 0:
                shapes += [
                    (f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1)),
                    (f"{p}.downsample.1.weight", (planes * 4,)),
                    (f"{p}.downsample.1.bias", (planes * 4,)),
                ]
            inplanes = planes * 4
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return shapes


def gpt2_small() -> list[tuple[str, tuple]]:
    """GPT-2 small (124.4M parameters; the LM head is tied to the token embedding)."""
    h = 768
    shapes = [("wte.weight", (50257, h)), ("wpe.weight", (1024, h))]
    for i in range(12):
        p = f"h.{i}"
        shapes += [
            (f"{p}.ln_1.weight", (h,)),
            (f"{p}.ln_1.bias", (h,)),
            (f"{p}.attn.c_attn.weight", (h, 3 * h)),
            (f"{p}.attn.c_attn.bias", (3 * h,)),
            (f"{p}.attn.c_proj.weight", (h, h)),
            (f"{p}.attn.c_proj.bias", (h,)),
            (f"{p}.ln_2.weight", (h,)),
            (f"{p}.ln_2.bias", (h,)),
            (f"{p}.mlp.c_fc.weight", (h, 4 * h)),
            (f"{p}.mlp.c_fc.bias", (4 * h,)),
            (f"{p}.mlp.c_proj.weight", (4 * h, h)),
            (f"{p}.mlp.c_proj.bias", (h,)),
        ]
    shapes += [("ln_f.weight", (h,)), ("ln_f.bias", (h,))]
    return shapes


def synthetic(n: int, tensors: int = 100) -> list[tuple[str, tuple]]:
    """``n`` parameters in about ``tensors`` tensors, shaped like a network's: 60% matrices (rows x 256,
    the last one takes the remainder) holding nearly everything, 40% bias-like vectors of n/4000 elements."""
    if n < 1:
        raise ValueError(f"synthetic:N needs N >= 1, got {n}")
    vectors = (tensors * 2) // 5
    matrices = tensors - vectors
    vec = max(1, n // 4000) if n >= 4 * tensors else 1
    if vec * vectors >= n:
        vectors = 0
    rest = n - vec * vectors
    matrices = max(1, min(matrices, rest))
    shapes = []
    base = rest // matrices
    if base >= 256:
        base -= base % 256
    for i in range(matrices):
        size = base if i < matrices - 1 else rest - base * (matrices - 1)
        shapes.append((f"matrix.{i}", (size // 256, 256) if size % 256 == 0 else (size,)))
    shapes += [(f"vector.{i}", (vec,)) for i in range(vectors)]
    return shapes


def many_small(tensors: int = 200, elements: int = 1000) -> list[tuple[str, tuple]]:
    """200 tensors of 1000 elements (0.2M parameters): per-tensor and per-launch overhead dominates, as in a
    model made of many biases and norms, and a multi-tensor step is judged by how little it pays per tensor."""
    return [(f"tensor.{i}", (elements,)) for i in range(tensors)]


def tiny_transformer(layers: int = 2, h: int = 64, vocab: int = 1000, positions: int = 128) -> list[tuple[str, tuple]]:
    """A d=64 encoder (36 tensors, 0.17M parameters): word and position embeddings with their LayerNorm, then
    BERT's layer at width 64 -- attention q/k/v/o 64x64 with biases, MLP 64x256/256x64 with biases, two
    LayerNorms -- twice. Small matrices and vectors mixed, where the per-tensor work of a step shows."""
    shapes = [
        ("embeddings.word_embeddings.weight", (vocab, h)),
        ("embeddings.position_embeddings.weight", (positions, h)),
        ("embeddings.LayerNorm.weight", (h,)),
        ("embeddings.LayerNorm.bias", (h,)),
    ]
    for i in range(layers):
        shapes += _bert_layer(h, 4 * h, f"encoder.layer.{i}")
    return shapes


RECIPES = {
    "many-small": many_small,
    "tiny-transformer": tiny_transformer,
    "bert-base-like": bert_base_like,
    "bert-base": lambda: _bert(12, 768, 30522),
    "bert-large": lambda: _bert(24, 1024, 30522),
    "vit-b32": vit_b32,
    "resnet50": resnet50,
    "gpt2-small": gpt2_small,
}


def model_shapes(name: str) -> list[tuple[str, tuple]]:
    """The (name, shape) list of a recipe, or of ``synthetic:N`` (N may be written 4e6 or 4_000_000)."""
    key = name.strip().lower()
    if key.startswith("synthetic:"):
        text = key.split(":", 1)[1].replace("_", "")
        try:
            n = int(float(text)) if any(c in text for c in ".e") else int(text)
        except ValueError:
            raise SystemExit(f"optgen bench: bad model {name!r}: expected synthetic:N") from None
        if n < 1:
            raise SystemExit(f"optgen bench: bad model {name!r}: synthetic:N needs N >= 1")
        return synthetic(n)
    if key not in RECIPES:
        raise SystemExit(f"optgen bench: unknown model {name!r}; known: {', '.join(RECIPES)}, synthetic:N")
    return RECIPES[key]()


def numel(shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


# -- implementations ------------------------------------------------------------------------------------

OPTIMIZERS = ("adamw", "adam", "sgd", "lamb", "lars", "nvlamb", "adafactor", "came")  # the ones with peers
HYPERS = {  # the same settings for every implementation of an optimizer
    "adamw": dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "adam": dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "sgd": dict(lr=1e-4, momentum=0.9, weight_decay=0.0),
    "lamb": dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
    "lars": dict(lr=1e-4, momentum=0.9, weight_decay=1e-4),
    "nvlamb": dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
    "adafactor": dict(lr=1e-2, weight_decay=0.01),
    "came": dict(lr=2e-4, weight_decay=0.01),
    "adamw8bit": dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "lamb8bit": dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
}


def resolve_optimizer(entry) -> tuple[str, type, bool]:
    """``(name, optimizer class, is a built-in)`` for a bench entry: a built-in name (``lamb``, ``lion`` ...),
    a ``path/to/file.py:VARIABLE`` holding a spec, or an optimizer class made by :func:`optgen.build`.

    Built-ins (also their classes, ``optgen.LAMB``) keep their CLI name, benchmark settings and peers; other
    specs are named after the spec and run with its default hyperparameters, without peers (whatever their
    name)."""
    import optgen

    from .runtime.optimizer import GeneratedOptimizer, build
    from .specs import BUILTINS

    if isinstance(entry, type) and issubclass(entry, GeneratedOptimizer):
        for key, factory in BUILTINS.items():
            if getattr(optgen, factory().name, None) is entry:
                return key, entry, True
        return entry._spec.name, entry, False
    if not isinstance(entry, str):
        raise SystemExit(f"optgen bench: {entry!r} is neither an optimizer name nor a class made by optgen.build")
    if entry.lower() in BUILTINS:
        return entry.lower(), getattr(optgen, BUILTINS[entry.lower()]().name), True
    spec = resolve_spec(entry)
    return spec.name, build(spec), False


@dataclass
class Impl:
    optimizer: str
    impl: str
    make: object  # params -> torch.optim.Optimizer; raises when it cannot run here
    env: dict = field(default_factory=dict)  # environment while the optimizer is built and takes its first step
    skip: str | None = None


@contextlib.contextmanager
def _environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def implementations(optimizer: str, cls: type, device: str, builtin: bool = True) -> list[Impl]:
    """optgen first, then its peers; each peer that cannot run here is an ``Impl`` with ``skip`` set."""
    hp = HYPERS.get(optimizer, {}) if builtin else {}
    peers_of = optimizer if builtin else None  # a user's spec: optgen's rows only, whatever its name
    cuda = device == "cuda"
    impls = [
        Impl(optimizer, "optgen", lambda ps: cls(ps, **hp)),
        Impl(optimizer, "optgen eager", lambda ps: cls(ps, backend="torch", **hp)),
    ]
    if cuda:
        # tuned on copies at its first step (cached on disk: a second run reuses the configs)
        impls.append(Impl(optimizer, "optgen autotuned", lambda ps: cls(ps, autotune=True, **hp)))
        # what a user gets from torch.compile without optgen's kernels: the generated torch passes, compiled
        impls.append(Impl(optimizer, "torch.compile(generated)", lambda ps: _compiled_step(cls(ps, backend="torch", **hp))))
    if peers_of in ("adamw", "adam", "sgd"):
        torch_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[peers_of]
        for name, kw in (("torch for-loop", {"foreach": False}), ("torch foreach", {"foreach": True}), ("torch fused", {"fused": True})):
            impls.append(Impl(optimizer, name, lambda ps, kw=kw: torch_cls(ps, **hp, **kw)))
    if peers_of == "adamw8bit":
        # torchao's AdamW8bit: the same maps and blocks, compiled per parameter by torch.compile (first steps)
        impls.append(_peer(optimizer, "torchao AdamW8bit", "torchao.optim", lambda m, ps: m.AdamW8bit(ps, **hp)))
        impls.append(_gpu_peer(optimizer, "bitsandbytes AdamW8bit", "bitsandbytes", lambda m, ps: m.optim.AdamW8bit(ps, **hp), cuda))
        impls.append(Impl(optimizer, "torch fused (fp32 state)", lambda ps: torch.optim.AdamW(ps, **hp, fused=True)))
    if peers_of == "lamb8bit":
        impls.append(_gpu_peer(optimizer, "bitsandbytes LAMB8bit", "bitsandbytes", lambda m, ps: m.optim.LAMB8bit(ps, **hp), cuda))
        impls.append(Impl(optimizer, "optgen LAMB (fp32 state)", lambda ps: _import("optgen").LAMB(ps, **hp)))
    if peers_of == "lamb":
        impls.append(_peer(optimizer, "pytorch-optimizer Lamb", "pytorch_optimizer", lambda m, ps: m.Lamb(ps, **hp)))
        impls.append(_peer(optimizer, "torch-optimizer Lamb", "torch_optimizer", lambda m, ps: m.Lamb(ps, **hp)))
        # timm clips the global gradient norm to 1 before the update by default (an extra pass over every
        # gradient); the other rows' LAMB has no such clip, so it is off to time the same update
        for name, kw in _timm_paths("timm Lamb", cuda):
            impls.append(_peer(optimizer, name, "timm.optim", lambda m, ps, kw=kw: m.Lamb(ps, **hp, max_grad_norm=None, **kw)))
        impls.append(_gpu_peer(optimizer, "bitsandbytes LAMB", "bitsandbytes", lambda m, ps: m.optim.LAMB(ps, **hp), cuda))
        impls.append(_gpu_peer(optimizer, "DeepSpeed FusedLamb", "deepspeed.ops.lamb", lambda m, ps: m.FusedLamb(ps, **hp), cuda))
    if peers_of == "adafactor":
        for name, kw in (("torch for-loop", {"foreach": False}), ("torch foreach", {"foreach": True})):
            impls.append(Impl(optimizer, name, lambda ps, kw=kw: torch.optim.Adafactor(ps, **hp, **kw)))
    if peers_of == "came":
        impls.append(_peer(optimizer, "came-pytorch", "came_pytorch", lambda m, ps: m.CAME(ps, **hp)))
    if peers_of == "lars":
        lars = dict(lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        impls.append(_peer(optimizer, "pytorch-optimizer LARS", "pytorch_optimizer", lambda m, ps: m.LARS(ps, **lars)))
        impls.append(_peer(optimizer, "torch-optimizer LARS", "torch_optimizer", lambda m, ps: m.LARS(ps, **lars)))
        for name, kw in _timm_paths("timm Lars", cuda):
            impls.append(_peer(optimizer, name, "timm.optim", lambda m, ps, kw=kw: m.Lars(ps, **lars, **kw)))
        impls.append(_gpu_peer(optimizer, "bitsandbytes LARS", "bitsandbytes", lambda m, ps: m.optim.LARS(ps, **lars), cuda))
    return impls


def _timm_paths(name: str, cuda: bool) -> tuple[tuple[str, dict], ...]:
    """timm's default path, and on CPU its foreach path too: timm picks foreach on CUDA but its per-tensor loop on
    CPU (as torch.optim does), where its foreach path is the faster of the two (bert-base-like and 200 x 1k LAMB)."""
    return ((name, {}),) if cuda else ((name, {}), (f"{name} foreach", {"foreach": True}))


def _import(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if module != "timm.optim":
            raise
        return _timm_optim_alone()


def _timm_optim_alone():
    """timm's optimizers without ``timm/__init__``, which imports torchvision (for its models and data).

    Lamb and Lars need only torch, and torchvision is not always installable beside the torch in use (PyPI's
    wheels pin their own torch build): the ``timm/optim`` folder is loaded as a package of its own, so its
    modules and their relative imports run unchanged and nothing of timm's models or data is imported."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed")
    name = "_optgen_bench_timm_optim"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(spec.submodule_search_locations[0], "optim")]
        sys.modules[name] = package
    package = sys.modules[name]
    package.Lamb = importlib.import_module(f"{name}.lamb").Lamb
    package.Lars = importlib.import_module(f"{name}.lars").Lars
    return package


def _peer(optimizer, impl, module, make) -> Impl:
    try:
        mod = _import(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        return Impl(optimizer, impl, None, skip=f"{module} not importable ({type(exc).__name__}: {str(exc)[:120]})")
    return Impl(optimizer, impl, lambda ps: make(mod, ps))


def _gpu_peer(optimizer, impl, module, make, cuda: bool) -> Impl:
    if not cuda:
        return Impl(optimizer, impl, None, skip="GPU only")
    return _peer(optimizer, impl, module, make)


# -- measurement ------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, mib: int | None = None) -> float:
    """GB/s of ``dst.copy_(src)`` on the device (bytes read + written), median of several copies."""
    mib = mib or (1024 if device == "cuda" else 256)
    n = mib * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(7):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


def _plan_of(cls: type):
    """The default plan of an optimizer class (flags as constructed with no options)."""
    return cls([torch.nn.Parameter(torch.zeros(1))]).plan


def bytes_per_param(cls: type, dtype: torch.dtype) -> float:
    """Bytes the optgen plan of ``cls`` moves per parameter per step, for ``dtype`` parameters and gradients
    (states in fp32, fp64 for fp64 parameters)."""
    plan = _plan_of(cls)
    own = torch.empty((), dtype=dtype).element_size()
    state = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    eight_bit = {name for name, _ in plan.quantized}  # codes and their share of the block scales
    total = 0
    for p in plan.passes:
        buffers = [ld.buffer for ld in p.loads] + [b for b, _ in p.stores]
        total += sum(own if b in ("param", "grad") else quantization.STATE_BYTES if b in eight_bit else state for b in buffers)
    return total


def _quantile(values, q: float) -> float:
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _make_params(shapes, device, dtype, seed: int):
    """Parameters and gradients drawn on the device itself: a 1B-parameter set drawn on the host (and copied)
    would take seconds per optimizer."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=g, device=device) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=g, device=device) * 1e-3).to(dtype)
        params.append(p)
    return params


def _compiled_step(opt):
    """``opt`` with its ``step`` compiled by ``torch.compile`` (dynamo traces the torch backend's eager passes;
    the first step pays the compile)."""
    opt.step = torch.compile(opt.step)
    return opt


def _path(opt) -> str | None:
    backends = getattr(opt, "_backends", None)
    if not backends:
        return None
    names = []
    for b in backends.values():
        if b.name == "torch":
            names.append("torch eager")
        elif getattr(b, "fallback", None) is not None:
            names.append(f"{b.name} unavailable: torch eager")
        else:
            names.append(b.name)
    return ",".join(sorted(set(names)))


def _launch_config(opt) -> dict | None:
    """The Triton backend's launch configuration after the measured steps (for the ``optgen autotuned`` row:
    the config the tuning chose); None where no Triton backend ran."""
    import dataclasses

    configs = []
    for b in (getattr(opt, "_backends", None) or {}).values():
        config = getattr(b, "config", None) if b.name == "triton" and getattr(b, "fallback", None) is None else None
        if config is not None and dataclasses.asdict(config) not in configs:
            configs.append(dataclasses.asdict(config))
    return configs[0] if len(configs) == 1 else (configs or None)


def selected(impl: str, only=None, skip=()) -> bool:
    """Whether ``--impls``/``--skip-impls`` keep the implementation named ``impl`` (names compared without case)."""
    name = impl.lower()
    return (only is None or name in {o.lower() for o in only}) and name not in {s.lower() for s in skip}


def check_impl_names(subjects, names) -> None:
    """Names given to ``--impls``/``--skip-impls`` that no implementation of the chosen optimizers has fail
    before anything is measured (a misspelt name would silently select nothing). The GPU-only rows' names are
    known on CPU too (they select nothing there), so that one command line serves both."""
    known = {
        impl.impl.lower(): impl.impl
        for optimizer, cls, builtin in subjects
        for device in ("cpu", "cuda")
        for impl in implementations(optimizer, cls, device, builtin)
    }
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise SystemExit(
            f"optgen bench: unknown implementation(s) {', '.join(map(repr, unknown))} for "
            f"{', '.join(name for name, _, _ in subjects)}; known: {', '.join(known.values())}"
        )


def measure_optimizer(
    optimizer, cls, model, shapes, device, dtype, rounds, warmup, log, sample_s=None, builtin=True, only=None, skip=()
) -> tuple[list, list]:
    """Rows and skipped entries for one optimizer on one parameter set (implementations interleaved);
    ``only``/``skip``: implementation names to keep/leave out (not listed as skipped)."""
    n = numel(shapes)
    params = _make_params(shapes, device, dtype, seed=0)
    rows, skipped, live = [], [], []
    for impl in implementations(optimizer, cls, device, builtin):
        if not selected(impl.impl, only, skip):
            continue
        if impl.skip:
            skipped.append({"optimizer": optimizer, "impl": impl.impl, "model": model, "reason": impl.skip})
            continue
        try:
            with _environ(impl.env):
                opt = impl.make(params)
                _sync(device)
                t0 = time.perf_counter()
                opt.step()
                _sync(device)
                first = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is skipped, with the reason
            skipped.append({"optimizer": optimizer, "impl": impl.impl, "model": model, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        live.append({"impl": impl, "opt": opt, "first": first, "times": [], "host": []})
        log(f"  {optimizer:7s} {impl.impl:28s} first step {first:8.3f} s")
    if not live:
        return rows, skipped
    # warm-up, and how many steps make one sample (>= ~20 ms on CPU, ~5 ms on GPU by default)
    target = sample_s if sample_s is not None else (0.005 if device == "cuda" else 0.02)
    for entry in live:
        t = []
        for _ in range(max(1, warmup)):
            _sync(device)
            t0 = time.perf_counter()
            entry["opt"].step()
            _sync(device)
            t.append(time.perf_counter() - t0)
        entry["inner"] = max(1, min(50, math.ceil(target / max(min(t), 1e-6))))
    counting = steal_jiffies() is not None
    for entry in live:
        entry["steal"] = 0  # ticks the hypervisor gave other machines while this row's samples ran
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)]
        for entry in order:
            opt, inner = entry["opt"], entry["inner"]
            stolen = steal_jiffies() if counting else None
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                start.record()
                for _ in range(inner):
                    opt.step()
                end.record()
                host = time.perf_counter() - t0
                end.synchronize()
                entry["times"].append(start.elapsed_time(end) / 1e3 / inner)
                entry["host"].append(host / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    opt.step()
                dt = (time.perf_counter() - t0) / inner
                entry["times"].append(dt)
                entry["host"].append(dt)
            if stolen is not None:
                entry["steal"] += steal_jiffies() - stolen
    bpp = bytes_per_param(cls, dtype)
    for entry in live:
        ts = entry["times"]
        med = statistics.median(ts)
        rows.append(
            {
                "optimizer": optimizer,
                "impl": entry["impl"].impl,
                "model": model,
                "params": n,
                "tensors": len(shapes),
                "dtype": str(dtype).replace("torch.", ""),
                "step_ms": med * 1e3,
                "p25_ms": _quantile(ts, 0.25) * 1e3,
                "p75_ms": _quantile(ts, 0.75) * 1e3,
                "min_ms": min(ts) * 1e3,
                "spread_pct": (_quantile(ts, 0.75) - _quantile(ts, 0.25)) / med * 100,
                "samples": len(ts),
                "steps_per_sample": entry["inner"],
                "bytes_per_param": bpp,
                "gbps": n * bpp / med / 1e9,
                "first_step_s": entry["first"],
                "host_ms": statistics.median(entry["host"]) * 1e3,
                "path": _path(entry["opt"]),
                "launch_config": _launch_config(entry["opt"]),
                "steal_pct": _steal_pct(entry["steal"], sum(entry["times"]) * entry["inner"]) if counting else None,
            }
        )
    _relate(rows)
    del live
    return rows, skipped


def _relate(rows: list[dict]) -> None:
    """Every row's ``vs``: each other row's step time of the same optimizer, parameter set and dtype over its own."""
    for row in rows:
        peers = (o for o in rows if o is not row and (o["optimizer"], o["model"], o["dtype"]) == (row["optimizer"], row["model"], row["dtype"]))
        row["vs"] = {o["impl"]: o["step_ms"] / row["step_ms"] for o in peers}


def versions() -> dict:
    import optgen

    out = {"python": platform.python_version(), "torch": torch.__version__, "optgen": optgen.__version__}
    for module, dist in (
        ("triton", "triton"),
        ("pytorch_optimizer", "pytorch-optimizer"),
        ("torch_optimizer", "torch-optimizer"),
        ("timm", "timm"),
        ("came_pytorch", "came-pytorch"),
        ("torchao", "torchao"),
        ("bitsandbytes", "bitsandbytes"),
        ("deepspeed", "deepspeed"),
        ("matplotlib", "matplotlib"),
    ):
        try:
            from importlib.metadata import version

            out[module] = version(dist)
        except Exception:  # noqa: BLE001 - not installed
            out[module] = None
    return out


def device_info(device: str) -> dict:
    info = {"type": device, "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    if device == "cuda":
        info["name"] = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        info["name"] = name
    return info


# -- trust ------------------------------------------------------------------------------------------------


def load_average() -> tuple[float, float, float] | None:
    """The 1-, 5- and 15-minute load averages, None where the platform has none. A function of its own so that
    a test can fake a busy machine."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def steal_jiffies() -> int | None:
    """CPU time the hypervisor gave other machines since boot, in clock ticks summed over the CPUs (the steal
    column of /proc/stat); None off Linux. Load averages cannot see it: a VM's own threads wait while another
    guest runs on its cores."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return int(fields[8]) if len(fields) > 8 and fields[0] == "cpu" else None


def _steal_pct(jiffies: int, seconds: float) -> float:
    """Stolen ticks as a share of the CPU time of ``seconds`` of samples on every core."""
    if seconds <= 0:
        return 0.0
    return jiffies / (seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)) * 100


STEAL_WARN_PCT = 5.0  # a row whose samples lost more of the CPU to other guests is flagged


def own_load(busy_threads: int, seconds: float) -> float:
    """What a run that kept ``busy_threads`` threads runnable for ``seconds`` adds to the 1-minute load average
    at its end: the kernel's average decays with a 60 s time constant, so it approaches the thread count
    as 1 - exp(-t/60). Discounted from the end's load, else every CPU run longer than ~40 s on all cores
    would find its own threads there and warn."""
    return busy_threads * (1 - math.exp(-seconds / 60))


def trust_warnings(loads, cores: int | None, rows: list[dict]) -> list[str]:
    """Why a report's step times may not be trusted. ``loads``: ``(when, 1-minute load of other work)`` pairs,
    the load ``None`` where unknown; ``rows`` with their ``copy_pct`` and ``steal_pct``.

    Other work above half the cores takes turns with the run's threads, so the samples time the scheduler too.
    On a VM, time stolen by other guests (the host's own load) is invisible to the load average; a row whose
    samples lost more than ``STEAL_WARN_PCT`` of the CPU to it is flagged.
    A row above 100% of the copy bandwidth means the copy, measured at the start and the end, is no ceiling
    for these updates: the copy was disturbed, or (on CPU) ``copy_`` pays a write-allocate read that in-place
    updates skip (fused AdamW reached 1.6-2.2x in bench/results). Either way %copy is then no
    share of the bandwidth the device can reach; the step times themselves are not affected."""
    warnings = []
    for when, load in loads:
        if load is not None and cores and load > cores / 2:
            warnings.append(
                f"1-minute load average of other work {load:.2f} {when}, above half of the {cores} cores: the "
                "machine was shared, step times and their spread are not trustworthy"
            )
    stolen = [r for r in rows if (r.get("steal_pct") or 0) > STEAL_WARN_PCT]
    if stolen:
        top = max(stolen, key=lambda r: r["steal_pct"])
        warnings.append(
            f"{len(stolen)} row(s) lost more than {STEAL_WARN_PCT:.0f}% of the CPU time to other machines on the "
            f"host while their samples ran (steal time; highest: {top['optimizer']} {top['impl']} on "
            f"{top['model']}, {top['steal_pct']:.0f}%): their step times include that wait"
        )
    above = [r for r in rows if r.get("copy_pct", 0) > 100]
    if above:
        top = max(above, key=lambda r: r["copy_pct"])
        warnings.append(
            f"{len(above)} row(s) above 100% of the measured copy bandwidth (highest: {top['optimizer']} "
            f"{top['impl']} on {top['model']}, {top['copy_pct']:.0f}%): the measured copy is no ceiling for these "
            "updates (disturbed, or on CPU slowed by the write-allocate read in-place updates skip), so %copy is "
            "not a share of the reachable bandwidth"
        )
    return warnings


def _runs_loads(report: dict) -> list[tuple]:
    """``(load averages at the start, at the end, the run's own load at the end)`` for each run of a report,
    one for a measured report, one per run for a merged one; ``None`` where a report written before these were
    recorded lacks them."""
    own = report.get("own_load")
    if isinstance(own, list):
        count = len(own)
        return list(zip(report.get("load_average_start") or [None] * count, report.get("load_average") or [None] * count, own))
    return [(report.get("load_average_start"), report.get("load_average"), own)]


def _load_warning_inputs(runs: list[tuple]) -> list[tuple[str, float | None]]:
    """The ``(when, 1-minute load of other work)`` pairs of :func:`_runs_loads`'s runs."""
    pairs = []
    for i, (start, end, own) in enumerate(runs, start=1):
        label = " of the run" if len(runs) == 1 else f" of run {i}"
        if start is not None:
            pairs.append((f"at the start{label}", start[0]))
        if end is not None and own is not None:
            pairs.append((f"at the end{label}", end[0] - own))
    return pairs


def run(
    optimizers=("adamw", "lamb"),
    models=("synthetic:4000000",),
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    rounds: int = 5,
    warmup: int = 2,
    log=print,
    sample_ms: float | None = None,
    only=None,
    skip=(),
) -> dict:
    """``only``/``skip``: implementation names (``optgen``, ``torch fused``, ``optgen autotuned`` ...) to measure
    alone / to leave out; a GPU session measures the slow-to-start rows in runs of their own and merges them."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("optgen bench: --device cuda but torch.cuda.is_available() is False")
    subjects = [resolve_optimizer(o) for o in optimizers]  # bad names fail before anything is measured
    shapes_of = {model: model_shapes(model) for model in models}  # bad models too
    only = None if only is None else list(only)
    skip = list(skip)
    check_impl_names(subjects, [*(only or []), *skip])  # and bad implementation names
    load_start = load_average()
    started = time.perf_counter()
    info = device_info(device)
    info["copy_gbps"] = copy_bandwidth(device)
    log(f"optgen bench on {info['name']} ({device}, {info['threads']} threads): copy {info['copy_gbps']:.1f} GB/s")
    results, skipped = [], []
    for model in models:
        shapes = shapes_of[model]
        log(f"{model}: {numel(shapes) / 1e6:.2f}M parameters in {len(shapes)} tensors")
        for optimizer, cls, builtin in subjects:
            sample_s = None if sample_ms is None else sample_ms / 1e3
            rows, skips = measure_optimizer(optimizer, cls, model, shapes, device, dtype, rounds, warmup, log, sample_s, builtin, only, skip)
            results += rows
            skipped += skips
    # the copy measured again at the end: on a shared machine the better of the two is the device's
    info["copy_gbps_start"] = info["copy_gbps"]
    info["copy_gbps_end"] = copy_bandwidth(device)
    info["copy_gbps"] = max(info["copy_gbps_start"], info["copy_gbps_end"])
    for row in results:
        row["copy_pct"] = row["gbps"] / info["copy_gbps"] * 100
    load_end = load_average()
    wall_s = time.perf_counter() - started
    # on CUDA the host thread waits for the device busily; on CPU every torch thread works
    busy_threads = 1 if device == "cuda" else info["threads"]
    report = {
        "device": info,
        "versions": versions(),
        "date": datetime.date.today().isoformat(),
        "config": {
            "optimizers": [name for name, _, _ in subjects],
            "models": list(models),
            "dtype": str(dtype).replace("torch.", ""),
            "rounds": rounds,
            "warmup": warmup,
            "sample_ms": sample_ms,
            "impls": only,
            "skip_impls": skip,
            "timer": "cuda events" if device == "cuda" else "time.perf_counter",
            "argv": sys.argv[1:],
        },
        "load_average_start": list(load_start) if load_start else None,
        "load_average": list(load_end) if load_end else None,
        "own_load": own_load(busy_threads, wall_s),
        "wall_s": wall_s,
        "results": results,
        "skipped": skipped,
    }
    report["warnings"] = trust_warnings(_load_warning_inputs(_runs_loads(report)), info["cores"], results)
    return report


def merge(reports: list[dict]) -> dict:
    """One report from several runs on one machine (a GPU session's bench split into calls that each fit
    its time limit): results, skips and models in order. The copy bandwidth is the best measured; runs on
    another device or with other versions are refused, since their rows would not compare."""
    if not reports:
        raise ValueError("nothing to merge")
    first = reports[0]
    for other in reports[1:]:
        for key in ("name", "type"):
            if other["device"].get(key) != first["device"].get(key):
                raise ValueError(f"cannot merge runs on {first['device'].get(key)!r} and {other['device'].get(key)!r}")
        if other["versions"] != first["versions"]:
            raise ValueError(f"cannot merge runs with versions {first['versions']} and {other['versions']}")
    device = dict(first["device"])
    device["copy_gbps"] = max(r["device"]["copy_gbps"] for r in reports)
    results = [dict(row) for r in reports for row in r["results"]]
    for row in results:  # one denominator for every row of the merged report
        row["copy_pct"] = row["gbps"] / device["copy_gbps"] * 100
    _relate(results)  # rows of one optimizer and set measured in separate runs (a slow-to-start row alone) compare too
    config = dict(first["config"])
    config["models"] = list(dict.fromkeys(m for r in reports for m in r["config"]["models"]))
    config["optimizers"] = list(dict.fromkeys(o for r in reports for o in r["config"]["optimizers"]))
    config["argv"] = [r["config"].get("argv") for r in reports]
    runs = [run_loads for r in reports for run_loads in _runs_loads(r)]
    return {
        **first,
        "device": device,
        "config": config,
        "date": max(r["date"] for r in reports),
        "load_average_start": [start for start, _, _ in runs],
        "load_average": [end for _, end, _ in runs],
        "own_load": [own for _, _, own in runs],
        "wall_s": sum(r["wall_s"] for r in reports),
        "results": results,
        "skipped": [s for r in reports for s in r["skipped"]],
        # the copy warning again for the common denominator; the load ones of every run
        "warnings": trust_warnings(_load_warning_inputs(runs), device.get("cores"), results),
    }


# -- output -----------------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    lines = []
    by_key: dict = {}
    for row in report["results"]:
        by_key.setdefault((row["model"], row["optimizer"]), []).append(row)
    header = f"{'impl':28s} {'median ms':>10s} {'p25-p75 ms':>15s} {'GB/s':>7s} {'%copy':>6s} {'optgen x':>9s} {'1st step s':>10s} {'host ms':>8s}  path"
    for (model, optimizer), rows in by_key.items():
        first = rows[0]
        lines.append(f"\n{optimizer} on {model} ({first['params'] / 1e6:.2f}M params, {first['tensors']} tensors, {first['dtype']}; {first['bytes_per_param']:g} B/param)")
        lines.append(header)
        ref = next((r for r in rows if r["impl"] == "optgen"), None)
        for r in rows:
            speed = f"{r['step_ms'] / ref['step_ms']:8.2f}x" if ref else "        -"
            lines.append(
                f"{r['impl']:28s} {r['step_ms']:10.2f} {r['p25_ms']:7.2f}-{r['p75_ms']:<7.2f} {r['gbps']:7.2f} "
                f"{r['copy_pct']:5.0f}% {speed} {r['first_step_s']:10.2f} {r['host_ms']:8.2f}  {r['path'] or ''}"
            )
    if report["skipped"]:
        lines.append("\nskipped:")
        seen = set()
        for s in report["skipped"]:
            key = (s["optimizer"], s["impl"], s["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"  {s['optimizer']}: {s['impl']}: {s['reason']}")
    lines.append(
        "\n'optgen x': this row's step time / optgen's (above 1: optgen is that many times faster). GB/s: "
        "parameters x the optgen plan's bytes per parameter / step time; %copy: of the measured copy bandwidth "
        f"({report['device']['copy_gbps']:.1f} GB/s)."
    )
    if report.get("warnings"):
        lines.append("\nWARNING, these numbers may not be trusted:")
        lines += [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Effective GB/s against model size, one line per implementation, one panel per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(r["optimizer"] for r in report["results"]))
    if not optimizers:
        optimizers = ["(no results)"]
    fig, axes = plt.subplots(1, len(optimizers), figsize=(6 * len(optimizers), 4.5), squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers):
        rows = [r for r in report["results"] if r["optimizer"] == optimizer]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["params"], r["gbps"]) for r in rows if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl, linewidth=2.5 if impl == "optgen" else 1.2)
        ax.axhline(report["device"]["copy_gbps"], color="gray", linestyle="--", linewidth=1, label="copy bandwidth")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("effective GB/s (plan bytes/param / step time)")
        ax.set_title(f"{optimizer} ({report['config']['dtype']})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    dev = report["device"]
    fig.suptitle(f"optgen bench: {dev['name']} ({dev['type']}, {dev['threads']} threads), torch {report['versions']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def main(args) -> int:
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    device = args.device
    models = [m.strip() for m in (args.model or "").split(",") if m.strip()]
    if not models:
        models = ["synthetic:4000000"] if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu" else ["synthetic:4000000", "bert-large"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype not in DTYPES:
        raise SystemExit(f"optgen bench: --dtype {args.dtype}: choose from {', '.join(DTYPES)}")
    if args.merge:
        try:
            reports = [json.loads(open(path).read()) for path in args.merge]
            report = merge(reports)
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"optgen bench --merge: {exc}") from None
    else:
        names = lambda text: [n.strip() for n in (text or "").split(",") if n.strip()]  # noqa: E731
        report = run(
            optimizers, models, device, DTYPES[args.dtype], rounds=args.rounds, warmup=args.warmup, log=print,
            sample_ms=args.sample_ms, only=names(args.impls) if args.impls else None, skip=names(args.skip_impls),
        )  # fmt: skip
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
