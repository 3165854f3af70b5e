"""Checks for notebook 04, many tenants on one frozen backbone: prefix files (``save_prefix`` /
``load_prefix``), one forward pass over a mixed-tenant batch (``mixed_prefix_forward``) and
greedy generation in such a batch (``mixed_generate``).

A mixed batch is judged row by row against the reference's SINGLE-tenant forward pass given the
same prefix values: row ``b`` must be what its tenant's prefix gives alone (to 1e-5). A
recording shows which tenant's keys/values every row received at every layer, the mask and the
position ids, so a failure names the row, the tenant and the layer.

Prefixes of different lengths in one batch may be handled either way, as long as it is done
clearly: rejected with a ``ValueError`` that says the lengths differ, or left-padded into masked
slots with each row's tokens at its own positions ``P_b .. P_b+T-1`` (rows then must equal the
single-tenant runs too).

Notation: ``L`` layers, ``H`` key/value heads, ``P`` prefix length, ``D`` head dim, ``B`` batch,
``T`` tokens. A prefix is a tensor ``(L, 2, H, P, D)``.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config

from autograder import reference
from autograder.checks.harness import CheckFailure, describe, max_diff, sandbox, student_call
from autograder.checks.models import Batch, tiny_model, tiny_models
from autograder.checks.prefix import FixedPrefix, _mask_is_extended, _run_recorded
from autograder.checks.recording import Recording
from course.compat import kv_geometry

__all__ = ["check_mixed_generate", "check_mixed_prefix_forward", "check_save_load_prefix"]

_ATOL = 1e-5
EQUAL = {"acme": 4, "bistro": 4, "cafe": 4}
MIXED = {"acme": 4, "bistro": 2, "cafe": 3}


def _tenants(model: nn.Module, lengths: dict[str, int], seed: int = 7) -> dict[str, torch.Tensor]:
    """Random prefixes ``(L, 2, H, P_t, D)`` for the tenants named in ``lengths``."""
    g = kv_geometry(model.config)
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(g["n_layers"], 2, g["n_kv_heads"], p, g["head_dim"], generator=gen)
        for name, p in lengths.items()
    }


def _alone(model: nn.Module, values: torch.Tensor, ids, mask, labels=None):
    """The reference single-tenant forward pass of rows ``ids (b, T)`` with ``values``."""
    with torch.no_grad():
        return reference.prefix_forward(model, FixedPrefix(values), ids, mask, labels)


def _shape_pattern(shape: tuple[int, ...], wildcard: int | None = None) -> re.Pattern:
    """A regex finding ``shape``'s numbers in order in a message (``3, 2, 4, 4, 8`` or
    ``[3, 2, 4, 4, 8]``); position ``wildcard`` may also be written as a letter (``P``)."""
    parts = [rf"(?:{n}|[A-Za-z_]\w*)" if i == wildcard else str(n) for i, n in enumerate(shape)]
    return re.compile(r"(?<!\d)" + r"\D{1,4}".join(parts) + r"(?!\d)")


# ---------------------------------------------------------------------------------------------
# save_prefix / load_prefix
# ---------------------------------------------------------------------------------------------
def _read_file(label: str, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise AssertionError(f"{label}: save_prefix(..., {path.name!r}, ...) wrote no file there")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise AssertionError(
            f"{label}: the file save_prefix wrote is not a safetensors file ({err}). Use "
            "safetensors.torch.save_file: torch.save writes a pickle, and loading a pickle from "
            "a tenant can run arbitrary code, while a safetensors file holds only tensors"
        ) from None


def _check_file(label: str, tensors: dict[str, torch.Tensor], values: torch.Tensor) -> None:
    total = sum(t.numel() for t in tensors.values())
    if total != values.numel():
        raise AssertionError(
            f"{label}: the prefix file holds {total} values in tensors {sorted(tensors)}, "
            f"expected only the prefix: L·2·H_kv·P·D = {values.numel()}. Save the values "
            "encoder() returns, not the encoder's state dict (a reparameterisation MLP is for "
            "training only; a tenant's file is just its prefix)"
        )
    if not any(t.shape == values.shape and max_diff(t, values) <= 1e-6 for t in tensors.values()):
        raise AssertionError(
            f"{label}: no tensor in the prefix file equals encoder() "
            f"{tuple(values.shape)} (L, 2, H_kv, P, D); found "
            + ", ".join(f"{k}: {describe(t)}" for k, t in tensors.items())
        )


def _check_loaded(label: str, loaded, values: torch.Tensor, meta: dict, how: str) -> None:
    if not (isinstance(loaded, tuple) and len(loaded) == 2):
        raise AssertionError(
            f"{label}: load_prefix({how}) returned {describe(loaded)}, expected a tuple "
            "(prefix (L, 2, H_kv, P, D), meta dict)"
        )
    prefix, got_meta = loaded
    if not isinstance(prefix, torch.Tensor) or prefix.shape != values.shape:
        raise AssertionError(
            f"{label}: load_prefix({how}) gave the prefix as {describe(prefix)}, expected "
            f"{tuple(values.shape)} (L, 2, H_kv, P, D)"
        )
    if max_diff(prefix, values) > 1e-6:
        raise AssertionError(
            f"{label}: the loaded prefix differs from the saved one by up to "
            f"{max_diff(prefix, values):.3g}: save and load the values unchanged"
        )
    if got_meta != meta:
        raise AssertionError(
            f"{label}: load_prefix({how}) gave meta {got_meta!r}, expected {meta!r} (what was "
            "passed to save_prefix, or {} when nothing was): store the meta dict as JSON in "
            "the file's metadata (safetensors metadata holds strings only)"
        )


def _check_refused(label: str, load_prefix: Callable, path: Path, config, have, want) -> None:
    what = (
        f"load_prefix(a prefix file of shape {tuple(have)}, the config of a model that needs "
        f"{tuple(want)})"
    )
    try:
        result = student_call(what, load_prefix, path, config)
    except CheckFailure as failure:
        err = failure.__cause__
        if err is None:
            raise  # the stub: "not implemented yet"
        if not isinstance(err, ValueError):
            raise AssertionError(
                f"{label}: {what} raised {type(err).__name__}: {err} — refuse it with a "
                "ValueError that names both shapes, before anything else touches the tensor"
            ) from None
        message = str(err)
        missing = [
            name
            for name, shape, wild in (("the file's shape", have, None), ("the model's", want, 3))
            if not _shape_pattern(tuple(shape), wild).search(message)
        ]
        if missing:
            raise AssertionError(
                f"{label}: {what} raised ValueError({message!r}), which does not name "
                f"{' and '.join(missing)}: say what the file holds and what the model needs, "
                f"e.g. 'prefix {tuple(have)} does not fit this model: it needs {tuple(want)} "
                "(L, 2, H_kv, P, D)'"
            ) from None
        return
    raise AssertionError(
        f"{label}: {what} returned {describe(result)} instead of raising: a prefix trained for "
        "another backbone must be refused with a ValueError. Compare the file's (L, 2, H_kv, "
        "P, D) with course.kv_geometry(config) (a matching NUMBER of values is not enough)"
    )


def check_save_load_prefix(save_prefix: Callable, load_prefix: Callable) -> None:
    """save_prefix/load_prefix: a safetensors file holding only the prefix values (no MLP), meta
    kept as given, values back unchanged; a prefix whose geometry does not fit the model (other
    layers, KV heads or head dim — even with as many values) is refused with a ValueError that
    names both shapes."""
    meta = {"tenant": "acme", "task": "sentiment", "steps": 40}
    with sandbox(), tempfile.TemporaryDirectory() as tmp:
        files = {}
        for label, model in tiny_models():
            encoder = reference.PrefixEncoder(model.config, 4, reparam=True, hidden=16, seed=8)
            values = encoder().detach()
            path = Path(tmp) / f"{label}-acme.safetensors"
            student_call("save_prefix(encoder, path, meta)", save_prefix, encoder, path, meta)
            _check_file(label, _read_file(label, path), values)
            how = "path, model.config"
            loaded = student_call(f"load_prefix({how})", load_prefix, path, model.config)
            _check_loaded(label, loaded, values, meta, how)

            tensor = reference.PrefixEncoder(model.config, 3, seed=9)()  # requires grad
            second = Path(tmp) / f"{label}-bistro.safetensors"
            student_call("save_prefix(tensor, str(path))", save_prefix, tensor, str(second))
            _check_file(label, _read_file(label, second), tensor.detach())
            loaded = student_call(
                "load_prefix(str(path), model.config)", load_prefix, str(second), model.config
            )
            _check_loaded(label, loaded, tensor.detach(), {}, "a file saved without meta")
            files[label] = (path, tuple(values.shape))

        path, have = files["GPT-2"]
        other = tiny_model("Llama-GQA").config
        g = kv_geometry(other)
        want = (g["n_layers"], 2, g["n_kv_heads"], have[3], g["head_dim"])
        _check_refused("GPT-2 prefix, Llama-GQA model", load_prefix, path, other, have, want)
        shallow = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64)
        want = (2, *have[1:])
        _check_refused("GPT-2 prefix, 2-layer model", load_prefix, path, shallow, have, want)


# ---------------------------------------------------------------------------------------------
# mixed_prefix_forward
# ---------------------------------------------------------------------------------------------
def _who(prefixes: dict[str, torch.Tensor], keys: torch.Tensor, layer: int, p: int) -> str | None:
    """Which tenant's layer-``layer`` (or layer-0) keys ``keys (H, P, D)`` are, if any."""
    for name, values in prefixes.items():
        if values.shape[3] == p and max_diff(keys, values[layer, 0]) <= 1e-6:
            return f"the prefix of tenant {name!r}"
    for name, values in prefixes.items():
        if values.shape[3] == p and max_diff(keys, values[0, 0]) <= 1e-6:
            return f"the LAYER-0 prefix of tenant {name!r}"
    return None


def _rows_got_their_prefix(
    label: str, rec: Recording, prefixes: dict[str, torch.Tensor], tenant_ids: list[str], t: int
) -> None:
    """Every layer: T queries, P+T keys; row ``b``'s prefix keys/values are its tenant's."""
    n_layers = next(iter(prefixes.values())).shape[0]
    p = max(v.shape[3] for v in prefixes.values())
    for layer in range(n_layers):
        calls = rec.layer_calls(layer)
        if not calls:
            raise AssertionError(f"{label}: the attention of layer {layer} never ran")
        call = calls[0]
        sizes = [c.key.shape[0] for c in calls]
        if sizes != [len(tenant_ids)]:
            raise AssertionError(
                f"{label}: layer {layer} ran {len(calls)} time(s) with batch sizes {sizes}, "
                f"expected ONE forward pass over all {len(tenant_ids)} rows: gather every row's "
                "prefix into one (B, H_kv, P, D) cache per layer instead of running tenant by "
                "tenant"
            )
        if call.query_len != t or call.key_len != p + t:
            raise AssertionError(
                f"{label}: layer {layer}: attention saw {call.key_len} keys for "
                f"{call.query_len} queries, expected {p + t} ({p} prefix + {t} tokens) for {t}: "
                "every layer's cache holds the batch's prefixes, (B, H_kv, P, D) per layer"
            )
        for row, tenant in enumerate(tenant_ids):
            want = prefixes[tenant][layer]
            keys, vals = call.key[row, :, :p].detach(), call.value[row, :, :p].detach()
            if max_diff(keys, want[0]) <= 1e-6 and max_diff(vals, want[1]) <= 1e-6:
                continue
            got = _who(prefixes, keys, layer, p)
            if got is not None and "LAYER-0" in got:
                hint = (
                    f"got {got}: one prefix shared by all layers, but layer l needs "
                    "prefixes[tenant][l]"
                )
            elif got is not None:
                hint = (
                    f"received {got} — gather prefixes[tenant_ids[row]] for every row, in "
                    "row order (the batch is not sorted by tenant)"
                )
            else:
                hint = (
                    "got keys/values that are no tenant's prefix: per layer stack "
                    "prefixes[tenant_ids[b]][layer, 0] (keys) and [layer, 1] (values) over b"
                )
            raise AssertionError(f"{label}: layer {layer}, row {row} (tenant {tenant!r}) {hint}")


def _compare_rows(
    label: str, model, out, prefixes, tenant_ids, batch: Batch, what: str, hint: str
) -> None:
    """Row ``b`` of ``out`` equals the reference run of tenant ``tenant_ids[b]`` alone."""
    logits = getattr(out, "logits", None)
    b, t = batch.shape
    vocab = model.config.vocab_size
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (b, t, vocab):
        raise AssertionError(
            f"{label}: {what} returned logits {describe(logits)}, expected {(b, t, vocab)} "
            "(B, T, vocab): one row per request, one position per real token"
        )
    wants = []
    for row, tenant in enumerate(tenant_ids):
        sl = slice(row, row + 1)
        want = _alone(model, prefixes[tenant], batch.input_ids[sl], batch.attention_mask[sl])
        real = batch.attention_mask[row].bool()
        diff = max_diff(logits[row, real], want.logits[0, real])
        if diff > _ATOL:
            raise AssertionError(
                f"{label}: {what}: row {row} (tenant {tenant!r}, P={prefixes[tenant].shape[3]}) "
                f"differs from running tenant {tenant!r} alone by up to {diff:.3g} — {hint}"
            )
        wants.append(want.logits[0])
    if batch.labels is None:
        return
    stacked = torch.stack(wants)
    expected = nn.functional.cross_entropy(
        stacked[:, :-1].reshape(-1, vocab), batch.labels[:, 1:].reshape(-1), ignore_index=-100
    )
    loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or abs(loss.item() - expected.item()) > _ATOL:
        raise AssertionError(
            f"{label}: {what}: loss {describe(loss) if loss is None else round(loss.item(), 6)} "
            f"differs from the batch's loss {expected.item():.6f}: pass labels (B, T) to the "
            "model"
        )


def _positions_per_row(label: str, rec: Recording, lengths: list[int], t: int) -> None:
    if not rec.positions:
        return
    got = rec.positions[0]
    for row, p in enumerate(lengths):
        want = list(range(p, p + t))
        seen = got[min(row, got.shape[0] - 1)].tolist()
        if seen != want:
            raise AssertionError(
                f"{label}: row {row} (its prefix has P={p}) took positions {seen}, expected "
                f"{want}: with prefixes of different lengths each row's tokens start at its OWN "
                "P, exactly where they would be if that tenant ran alone"
            )


def _pad_slots_hidden(label: str, rec: Recording, lengths: list[int]) -> None:
    visible = rec.layer_calls(0)[0].visible() if rec.layer_calls(0) else None
    if visible is None:
        return
    p = max(lengths)
    for row, n in enumerate(lengths):
        if n < p and visible[row, :, : p - n].any():
            raise AssertionError(
                f"{label}: row {row} (P={n}) can attend to the {p - n} padded prefix slots in "
                f"front of its prefix: left-padded slots must be masked (0 in the mask), or the "
                "row attends to keys its tenant never trained"
            )


def _different_lengths(label: str, model, mixed_prefix_forward: Callable) -> None:
    prefixes = _tenants(model, MIXED, seed=11)
    tenant_ids = ["bistro", "acme", "cafe", "bistro"]
    batch = Batch(batch=4, length=6, pad=2, seed=6)
    lengths = [prefixes[t].shape[3] for t in tenant_ids]
    what = f"mixed_prefix_forward with prefix lengths {lengths}"
    rec, out, failure = _run_recorded(
        model, what, mixed_prefix_forward, model, prefixes, tenant_ids, batch.input_ids,
        batch.attention_mask, batch.labels,
    )  # fmt: skip
    if failure is not None:
        cause = failure.__cause__
        if isinstance(cause, ValueError) and re.search(r"length|\bP\b|size", str(cause), re.I):
            return  # rejected, clearly
        raise AssertionError(
            f"{label}: {what} failed ({failure}). Tenants' prefixes may differ in length: "
            "either reject such a batch with a ValueError that says the prefix lengths differ, "
            "or left-pad the shorter prefixes into masked slots"
        ) from None
    _pad_slots_hidden(label, rec, lengths)
    _positions_per_row(label, rec, lengths, batch.shape[1])
    hint = (
        "left-pad each shorter prefix into masked slots and start each row's positions at its own P"
    )
    _compare_rows(label, model, out, prefixes, tenant_ids, batch, what, hint)


def _unknown_tenant(label: str, model, mixed_prefix_forward: Callable) -> None:
    prefixes = _tenants(model, EQUAL)
    batch = Batch(batch=2, length=5, pad=0, seed=7)
    try:
        out = mixed_prefix_forward(
            model, prefixes, ["acme", "nobody"], batch.input_ids, batch.attention_mask
        )
    except Exception as err:  # noqa: BLE001 - any refusal that names the tenant will do
        if "nobody" in str(err):
            return
        raise AssertionError(
            f"{label}: a row for the unknown tenant 'nobody' raised {type(err).__name__}: {err} "
            "— name the unknown tenant in the error (a KeyError on prefixes[tenant] does)"
        ) from None
    raise AssertionError(
        f"{label}: mixed_prefix_forward served a row for the unknown tenant 'nobody' (returned "
        f"{describe(getattr(out, 'logits', out))}) instead of raising: never give a request "
        "another tenant's prefix (or none)"
    )


def check_mixed_prefix_forward(mixed_prefix_forward: Callable) -> None:
    """mixed_prefix_forward: one forward pass over a mixed-tenant batch; at every layer row b
    gets its own tenant's prefix keys/values, the mask is extended, and every row equals that
    tenant's single-tenant prefix_forward (1e-5), loss included; prefixes of different lengths
    are rejected clearly or left-padded into masked slots; an unknown tenant is refused."""
    with sandbox():
        for label, model in tiny_models():
            reference.freeze_backbone(model)
            prefixes = _tenants(model, EQUAL)
            before = {k: v.clone() for k, v in prefixes.items()}
            tenant_ids = ["bistro", "acme", "cafe", "acme"]
            batch = Batch(batch=4, length=6, pad=2, seed=5)
            what = "mixed_prefix_forward(model, prefixes, tenant_ids, input_ids, mask, labels)"
            rec, out, failure = _run_recorded(
                model, what, mixed_prefix_forward, model, prefixes, tenant_ids, batch.input_ids,
                batch.attention_mask, batch.labels,
            )  # fmt: skip
            if failure is not None:
                raise failure
            _rows_got_their_prefix(label, rec, prefixes, tenant_ids, batch.shape[1])
            _mask_is_extended(label, rec, batch, 4)
            _positions_per_row(label, rec, [4] * 4, batch.shape[1])
            hint = "check the mask (P ones in front) and the positions (P..P+T-1)"
            _compare_rows(label, model, out, prefixes, tenant_ids, batch, what, hint)
            again = "a second call with the same prefixes"
            out2 = student_call(
                again, mixed_prefix_forward, model, prefixes, tenant_ids, batch.input_ids,
                batch.attention_mask, batch.labels,
            )  # fmt: skip
            _compare_rows(label, model, out2, prefixes, tenant_ids, batch, again, "fresh cache?")
            changed = [k for k in prefixes if not torch.equal(prefixes[k], before[k])]
            if changed:
                raise AssertionError(
                    f"{label}: mixed_prefix_forward changed the stored prefixes of {changed}: "
                    "serving must never write to a tenant's prefix"
                )
            _different_lengths(label, model, mixed_prefix_forward)
            _unknown_tenant(label, model, mixed_prefix_forward)


# ---------------------------------------------------------------------------------------------
# mixed_generate
# ---------------------------------------------------------------------------------------------
def _greedy_row(model, values: torch.Tensor, prompt: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether ``new (N,)`` are the greedy choices (ties within 1e-4) of the reference forward
    with ``values`` over ``prompt + new``, up to and including the first eos."""
    full = torch.cat([prompt, new])[None]
    logits = _alone(model, values, full, torch.ones_like(full)).logits[0, len(prompt) - 1 : -1]
    eos = model.config.eos_token_id
    for token, step in zip(new.tolist(), logits):
        if step.max() - step[token] > 1e-4:
            return False
        if token == eos:
            break
    return True


def _rows_agree(model, prefixes, tenant_ids, batch: Batch, new: torch.Tensor) -> list[int]:
    """The rows whose new tokens are NOT their tenant's greedy choices."""
    wrong = []
    for row, tenant in enumerate(tenant_ids):
        prompt = batch.input_ids[row, batch.attention_mask[row].bool()]
        if not _greedy_row(model, prefixes[tenant], prompt, new[row]):
            wrong.append(row)
    return wrong


def _generate(label, mixed_generate, model, prefixes, tenant_ids, batch, n_new, what):
    new = student_call(
        what, mixed_generate, model, prefixes, tenant_ids, batch.input_ids,
        batch.attention_mask, n_new,
    )  # fmt: skip
    b, t = batch.shape
    if not isinstance(new, torch.Tensor) or new.dim() != 2 or new.shape[0] != b:
        raise AssertionError(
            f"{label}: {what} returned {describe(new)}, expected the new token ids ({b}, <= "
            f"{n_new})"
        )
    if new.shape[1] > t and torch.equal(new[:, :t], batch.input_ids):
        raise AssertionError(
            f"{label}: {what} returned {new.shape[1]} tokens per row, starting with the {t} "
            "prompt tokens: return only the new ones (out[:, input_ids.shape[1]:])"
        )
    if not 0 < new.shape[1] <= n_new:
        raise AssertionError(
            f"{label}: {what} returned {new.shape[1]} tokens per row, expected 1..{n_new}"
        )
    return new


def check_mixed_generate(mixed_generate: Callable) -> None:
    """mixed_generate: greedy generation for a mixed-tenant, left-padded batch returns only the
    new tokens, and each row's tokens are the greedy choices of its own tenant's prefix alone;
    prefixes of different lengths are rejected clearly or handled row-exactly."""
    n_new = 4
    with sandbox():
        for label, model in tiny_models():
            prefixes = _tenants(model, EQUAL, seed=12)
            tenant_ids = ["cafe", "acme", "bistro", "acme"]
            batch = Batch(batch=4, length=6, pad=2, seed=8)
            what = f"mixed_generate(model, prefixes, tenant_ids, input_ids, mask, {n_new})"
            new = _generate(label, mixed_generate, model, prefixes, tenant_ids, batch, n_new, what)
            wrong = _rows_agree(model, prefixes, tenant_ids, batch, new)
            if wrong:
                row = wrong[0]
                first = {t: prefixes[tenant_ids[0]] for t in prefixes}
                with torch.no_grad():
                    plain = model.generate(
                        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        max_new_tokens=new.shape[1], do_sample=False,
                        pad_token_id=model.config.eos_token_id,
                    )[:, batch.shape[1]:]  # fmt: skip
                if torch.equal(plain, new):
                    hint = (
                        "they are what the model generates WITHOUT any prefix: pass the "
                        "gathered prefix cache to generate (course.cache_keyword(model))"
                    )
                elif not _rows_agree(model, first, tenant_ids, batch, new):
                    hint = (
                        f"every row was generated with the prefix of tenant {tenant_ids[0]!r}: "
                        "gather prefixes[tenant_ids[row]] row by row"
                    )
                else:
                    hint = (
                        "is the mask extended by the prefix slots in front, (B, P+T)? generate "
                        "derives positions from it"
                    )
                raise AssertionError(
                    f"{label}: row {row} (tenant {tenant_ids[row]!r}) generated "
                    f"{new[row].tolist()}, which are not the greedy choices of its own "
                    f"tenant's prefix alone (rows {wrong} disagree): {hint}"
                )
            prefixes = _tenants(model, MIXED, seed=13)
            lengths = [prefixes[t].shape[3] for t in tenant_ids]
            what = f"mixed_generate with prefix lengths {lengths}"
            try:
                new = _generate(
                    label, mixed_generate, model, prefixes, tenant_ids, batch, n_new, what
                )
            except CheckFailure as failure:
                cause = failure.__cause__
                if isinstance(cause, ValueError) and re.search(
                    r"length|\bP\b|size", str(cause), re.I
                ):
                    continue
                raise
            wrong = _rows_agree(model, prefixes, tenant_ids, batch, new)
            if wrong:
                raise AssertionError(
                    f"{label}: {what}: rows {wrong} are not their tenant's greedy choices: "
                    "left-pad shorter prefixes into MASKED slots (generate then places each "
                    "row's tokens right after its own prefix), or reject such a batch with a "
                    "ValueError"
                )
