"""The graded objects as a student first sees them: signatures and ``raise
NotImplementedError()`` where nbgrader removed the solution. Every check must fail on these with
"not implemented yet: fill in the YOUR CODE HERE cell of <name>"."""

from __future__ import annotations

from torch import nn

__all__ = ["STUBS"]


def freeze_backbone(model):
    # YOUR CODE HERE
    raise NotImplementedError()


class SoftPrompt(nn.Module):
    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0):
        super().__init__()
        # YOUR CODE HERE
        raise NotImplementedError()

    def forward(self, batch_size):
        # YOUR CODE HERE
        raise NotImplementedError()


def prepend_prompt(model, prompt, input_ids, attention_mask, labels=None):
    # YOUR CODE HERE
    raise NotImplementedError()


def save_prompt(prompt, path):
    # YOUR CODE HERE
    raise NotImplementedError()


def load_prompt(path, embedding):
    # YOUR CODE HERE
    raise NotImplementedError()


class PrefixEncoder(nn.Module):
    def __init__(self, config, prefix_len, reparam=False, hidden=512, init_std=1.0, seed=0):
        super().__init__()
        # YOUR CODE HERE
        raise NotImplementedError()

    def forward(self):
        # YOUR CODE HERE
        raise NotImplementedError()

    def export(self):
        # YOUR CODE HERE
        raise NotImplementedError()


def build_prefix_cache(prefix, batch_size, dtype):
    # YOUR CODE HERE
    raise NotImplementedError()


def prefix_forward(model, encoder, input_ids, attention_mask, labels=None):
    # YOUR CODE HERE
    raise NotImplementedError()


def generate_with_prefix(model, encoder, input_ids, attention_mask, max_new_tokens=20):
    # YOUR CODE HERE
    raise NotImplementedError()


class DeepPrompt(nn.Module):
    def __init__(self, config, prompt_len, init_std=0.02, seed=0):
        super().__init__()
        # YOUR CODE HERE
        raise NotImplementedError()


def deep_prompt_forward(model, deep, input_ids, attention_mask, labels=None):
    # YOUR CODE HERE
    raise NotImplementedError()


def soft_prompt_to_prefix(model, prompt):
    # YOUR CODE HERE
    raise NotImplementedError()


def deep_prompt_to_prefix(model, deep):
    # YOUR CODE HERE
    raise NotImplementedError()


def prompt_function(template, x):
    # YOUR CODE HERE
    raise NotImplementedError()


def label_scores(logits, attention_mask, label_ids):
    # YOUR CODE HERE
    raise NotImplementedError()


def save_prefix(encoder_or_tensor, path, meta=None):
    # YOUR CODE HERE
    raise NotImplementedError()


def load_prefix(path, config):
    # YOUR CODE HERE
    raise NotImplementedError()


def mixed_prefix_forward(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    # YOUR CODE HERE
    raise NotImplementedError()


def mixed_generate(model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20):
    # YOUR CODE HERE
    raise NotImplementedError()


def checkpoint_safe_prefix_forward(model, encoder, input_ids, attention_mask, labels=None):
    # YOUR CODE HERE
    raise NotImplementedError()


def make_method(
    name, model, tok, length=10, init="vocab", init_text="", hidden=128, rank=4, init_std=0.5,
    seed=0,
):  # fmt: skip
    # YOUR CODE HERE
    raise NotImplementedError()


def run_sweep(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    # YOUR CODE HERE
    raise NotImplementedError()


STUBS: dict[str, object] = {
    "freeze_backbone": freeze_backbone,
    "SoftPrompt": SoftPrompt,
    "prepend_prompt": prepend_prompt,
    "save_prompt": save_prompt,
    "load_prompt": load_prompt,
    "PrefixEncoder": PrefixEncoder,
    "build_prefix_cache": build_prefix_cache,
    "prefix_forward": prefix_forward,
    "generate_with_prefix": generate_with_prefix,
    "DeepPrompt": DeepPrompt,
    "deep_prompt_forward": deep_prompt_forward,
    "soft_prompt_to_prefix": soft_prompt_to_prefix,
    "deep_prompt_to_prefix": deep_prompt_to_prefix,
    "prompt_function": prompt_function,
    "label_scores": label_scores,
    "save_prefix": save_prefix,
    "load_prefix": load_prefix,
    "mixed_prefix_forward": mixed_prefix_forward,
    "mixed_generate": mixed_generate,
    "checkpoint_safe_prefix_forward": checkpoint_safe_prefix_forward,
    "make_method": make_method,
    "run_sweep": run_sweep,
}
