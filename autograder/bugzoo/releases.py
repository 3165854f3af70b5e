"""The prefix service's broken releases (notebook 05), kept as their source code.

The debugging lab shows each release's code, or its diff against the release before, runs exactly
that code to produce the ticket's symptoms, and grades the student's *patch* of it with the checks
notebook 02 used. Each release is also a bug of this zoo (notebook ``"05"``), so ``test_bugzoo``
proves its check fails on it with the named message, and ``autograder verify`` proves that a
student who hands the release in unpatched loses exactly the patch's cells.

The sources are the platform's code written out (a release with its bug fixed is notebook 02's
answer), so a student package has this module only once notebook 02 is unlocked.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from autograder import reference
from autograder.bugzoo import Bug

__all__ = ["BUGS", "RELEASES", "Release", "release"]

_PREAMBLE = "import torch\n\nimport course\n"

_CACHE_20 = '''\
def build_prefix_cache(prefix, batch_size, dtype):
    """A fresh cache: at layer ``l``, keys ``prefix[l, 0]`` and values ``prefix[l, 1]``,
    each ``(batch_size, H, P, D)`` in ``dtype``; ``prefix`` is ``(L, 2, H, P, D)``."""
    keys = prefix[0, 0].to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1)
    values = prefix[0, 1].to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1)
    return course.make_cache([(keys, values)])
'''

_CACHE_21 = _CACHE_20.replace(
    "    return course.make_cache([(keys, values)])\n",
    "    return course.make_cache([(keys, values)] * len(prefix))  # one entry per layer\n",
)

_FORWARD_22 = '''\
def prefix_forward(model, encoder, input_ids, attention_mask, labels=None):
    """``model`` on ``input_ids (B, T)`` with ``encoder()`` as every layer's prefix."""
    batch, length = input_ids.shape
    p = encoder.prefix_len
    positions = torch.arange(p, p + length, device=input_ids.device).expand(batch, -1)
    prefix = encoder()
    cache = build_prefix_cache(prefix, batch, prefix.dtype)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        **{course.cache_keyword(model): cache},
    )
'''

_FORWARD_23 = _FORWARD_22.replace(
    "    positions = torch.arange(p, p + length, device=input_ids.device).expand(batch, -1)\n",
    "    mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)\n"
    "    # the prefix takes no position: the tokens are 0..T-1\n"
    "    positions = torch.arange(length, device=input_ids.device).expand(batch, -1)\n",
).replace("        attention_mask=attention_mask,\n", "        attention_mask=mask,\n")

_FORWARD_24 = (
    "_CACHES = {}  # encoder -> its prefix cache, built once instead of on every request\n\n\n"
    + _FORWARD_23.replace(
        "    # the prefix takes no position: the tokens are 0..T-1\n"
        "    positions = torch.arange(length, device=input_ids.device).expand(batch, -1)\n",
        "    positions = torch.arange(p, p + length, device=input_ids.device).expand(batch, -1)\n",
    ).replace(
        "    prefix = encoder()\n    cache = build_prefix_cache(prefix, batch, prefix.dtype)\n",
        "    if encoder not in _CACHES:\n"
        "        prefix = encoder()\n"
        "        _CACHES[encoder] = build_prefix_cache(prefix, batch, prefix.dtype)\n"
        "    cache = _CACHES[encoder]\n",
    )
)

_FREEZE_25 = '''\
def freeze_backbone(model):
    """Freezes the shared backbone before a tenant's prefix is trained; returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model
'''

_FREEZE_26 = _FREEZE_25.replace(
    "    for p in model.parameters():\n        p.requires_grad_(False)\n",
    "    model.eval()  # inference mode: dropout off, and nothing to train\n",
)

_COMPILE_28 = '''\
@torch.no_grad()
def soft_prompt_to_prefix(model, prompt):
    """A prompt-tuned tenant's vectors ``(P, d)`` as a prefix for the serving path,
    ``(L, 2, H, P, D)``, computed once per tenant."""
    dtype = model.get_input_embeddings().weight.dtype
    vectors = prompt.detach().to(model.device, dtype).unsqueeze(0)  # (1, P, d)

    def tenant_vectors(module, args, kwargs):  # the tenant's vectors, again, as the input
        if args:
            return (vectors, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": vectors}

    base = model.base_model
    layers = base.h if hasattr(base, "h") else base.layers
    hooks = [  # prompt tuning "at every layer": each later layer also starts from the vectors
        layer.register_forward_pre_hook(tenant_vectors, with_kwargs=True) for layer in layers[1:]
    ]
    try:
        out = model(inputs_embeds=vectors, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    cache = course.output_cache(out)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
'''


@dataclass(frozen=True)
class Release:
    """One shipped version of one function of the prefix service.

    Attributes:
        version: ``"2.0"`` ... ``"2.8"``.
        function: the function it shipped (a graded name of notebook 05).
        incidents: the tickets its bug caused.
        source: the function's code as shipped.
        before: the version this one changed (its diff is shown), or ``None`` (shown whole).
        bug: what is wrong with it, for the instructor (never shown to students).
    """

    version: str
    function: str
    incidents: tuple[str, ...]
    source: str
    before: str | None
    bug: str

    @property
    def key(self) -> str:
        return f"{self.function}_{self.version.replace('.', '_')}"


RELEASES: dict[str, Release] = {
    r.key: r
    for r in (
        Release(
            "2.0",
            "build_prefix_cache",
            ("INC-1",),
            _CACHE_20,
            None,
            "a one-layer cache: only layer 0 gets the prefix",
        ),
        Release(
            "2.1",
            "build_prefix_cache",
            ("INC-2",),
            _CACHE_21,
            "2.0",
            "layer 0's prefix repeated for every layer: prefix[1:] is never read",
        ),
        Release(
            "2.2",
            "prefix_forward",
            ("INC-4",),
            _FORWARD_22,
            None,
            "the (B, T) mask with a P-long cache hides the last P tokens (and the cache keeps "
            "the prefix's dtype, INC-7's bug, not yet seen in float32)",
        ),
        Release(
            "2.3",
            "prefix_forward",
            ("INC-5",),
            _FORWARD_23,
            "2.2",
            "mask fixed, but the real tokens are numbered 0..T-1 under a prefix trained with "
            "them at P..P+T-1",
        ),
        Release(
            "2.4",
            "prefix_forward",
            ("INC-6", "INC-7"),
            _FORWARD_24,
            "2.3",
            "positions fixed, but one cache per encoder is kept and grows (INC-6), and it is "
            "built in the prefix's float32 whatever the model's dtype (INC-7)",
        ),
        Release("2.5", "freeze_backbone", (), _FREEZE_25, None, "none: the last good freeze"),
        Release(
            "2.6",
            "freeze_backbone",
            ("INC-8",),
            _FREEZE_26,
            "2.5",
            "eval() for freezing: every weight still requires grad, so the trainer fine-tunes "
            "the shared backbone",
        ),
        Release(
            "2.8",
            "soft_prompt_to_prefix",
            ("INC-10",),
            _COMPILE_28,
            None,
            "a prompt-tuning tenant compiled as if its vectors were every layer's input: "
            "layer 0's keys and values are right, every later layer's are not what the frozen "
            "model computes at the prompt positions",
        ),
    )
}
"""Release key (``<function>_<version>``) -> the release."""

_NAMES: dict[str, object] = {}


def _build(rel: Release) -> tuple[object, dict[str, object]]:
    """Execute ``rel``'s source (with the reference for what it calls but does not define);
    its function, renamed to the release's key, and the namespace it runs in."""
    namespace: dict[str, object] = {"__name__": __name__}
    exec(compile(_PREAMBLE, f"<release {rel.version}>", "exec"), namespace)  # noqa: S102
    namespace["build_prefix_cache"] = reference.build_prefix_cache
    if rel.function == "build_prefix_cache":  # the service's forward, calling this release's
        exec(compile(_FORWARD_OK, "<release base>", "exec"), namespace)  # noqa: S102
    exec(compile(rel.source, f"<release {rel.version}: {rel.function}>", "exec"), namespace)  # noqa: S102
    fn = namespace[rel.function]
    fn.__qualname__ = fn.__name__ = rel.key
    fn.__module__ = __name__
    return fn, namespace


_FORWARD_OK = _FORWARD_24.split("\n\n\n", 1)[1].replace(
    "    if encoder not in _CACHES:\n"
    "        prefix = encoder()\n"
    "        _CACHES[encoder] = build_prefix_cache(prefix, batch, prefix.dtype)\n"
    "    cache = _CACHES[encoder]\n",
    "    cache = build_prefix_cache(encoder(), batch, model.dtype)\n",
)
"""The service's ``prefix_forward`` as it should be, for releases that changed only
``build_prefix_cache`` (never shown: it is notebook 02's answer, and Fix 2's)."""

_FORWARDS: dict[str, object] = {}
for _rel in RELEASES.values():
    _fn, _namespace = _build(_rel)
    setattr(sys.modules[__name__], _rel.key, _fn)
    _NAMES[_rel.key] = _fn
    if _rel.function == "build_prefix_cache":  # the service's forward, on this release's cache
        _forward = _namespace["prefix_forward"]
        _forward.__qualname__ = _forward.__name__ = f"prefix_forward_with_cache_{_rel.version}"
        _forward.__module__ = __name__
        setattr(sys.modules[__name__], _forward.__name__, _forward)
        _FORWARDS[_rel.key] = _forward
del _rel, _fn, _namespace


def release(key: str) -> object:
    """The function a release shipped, by key (``"prefix_forward_2_4"``)."""
    return _NAMES[key]


def service_forward(key: str) -> object:
    """The service's ``prefix_forward`` as a ``build_prefix_cache`` release shipped it."""
    return _FORWARDS[key]


def _bug(key: str, caught_by: str, message: str, also=(), downstream=()) -> Bug:
    rel = RELEASES[key]
    return Bug(
        name=f"release_{key}",
        description=f"release {rel.version}'s {rel.function}, unpatched: {rel.bug}",
        notebook="05",
        replaces={rel.function: release(key)},
        caught_by=(caught_by,),
        message_contains=message,
        also_fails=tuple(also),
        downstream=tuple(downstream),
    )


_THROUGH_FORWARD = ("check_prefix_forward", "check_bf16", "check_checkpointed_prefix_forward")
BUGS = [
    _bug(
        "build_prefix_cache_2_0",
        "check_build_prefix_cache",
        "add the prefix to EVERY layer",
        downstream=(*_THROUGH_FORWARD, "check_prefix_training"),
    ),
    _bug(
        "build_prefix_cache_2_1",
        "check_build_prefix_cache",
        "the cache does not hold prefix[1, 0]",
        downstream=_THROUGH_FORWARD,
    ),
    _bug(
        "prefix_forward_2_2",
        "check_prefix_forward",
        "is attention_mask extended",
        also=("check_bf16",),
        downstream=("check_checkpointed_prefix_forward",),
    ),
    _bug(
        "prefix_forward_2_3",
        "check_prefix_forward",
        "the real tokens took positions",
        also=("check_bf16",),
        downstream=("check_checkpointed_prefix_forward",),
    ),
    _bug(
        "prefix_forward_2_4",
        "check_prefix_forward",
        "build a fresh cache in every call",
        also=("check_bf16", "check_prefix_training"),
    ),
    _bug(
        "freeze_backbone_2_6",
        "check_freeze_backbone",
        "model.eval()",
        also=("check_prefix_training",),
    ),
    _bug(
        "soft_prompt_to_prefix_2_8",
        "check_soft_prompt_to_prefix",
        "from what the frozen layer computes at the prompt positions",
    ),
]
"""Each broken release as the bug a student leaves in when they hand it in unpatched."""
