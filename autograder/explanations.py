"""One line per option of every multiple-choice question: why that option holds, or why not.

The visible check, :func:`autograder.selfcheck.check_answer`, shows the line of the option a
student chose: after a wrong answer, why that option does not hold (never the right option's
line, never its letter); after the right answer, why it is right. Grading never reads this
module: the hidden tests judge the letter alone (:mod:`autograder.checks.quiz`).

Each question id maps every option letter of its notebook cell, and no other, to one sentence
(``tests/test_quiz_design.py`` checks both against the solution notebooks). A line never names
an option by its letter: options are reordered when a question is revised. Reading this file
tells the right options apart, just as hashing the four letters does (:mod:`autograder.answers`):
it helps a student who wants to learn, and the grade does not rest on it.
"""

from __future__ import annotations

__all__ = ["EXPLANATIONS"]

EXPLANATIONS: dict[str, dict[str, str]] = {
    "nb00_q1": {
        "a": "fp32 stores each number in 4 bytes, not 1.",
        "b": (
            "200 prompts × 10 vectors × 768 numbers × 4 bytes (fp32) ≈ 6.1 MB, against about 100 "
            "GB for 200 fine-tuned copies."
        ),
        "c": (
            "Keys and values at all 12 layers would be a deep prefix; a soft prompt is only its "
            "input vectors."
        ),
        "d": (
            "All 200 prompts run on the one shared frozen copy; each adds only its own few numbers."
        ),
    },
    "nb00_q2": {
        "a": (
            "This is a genuine reason: one shared backbone plus kilobytes per task replaces one "
            "model copy per task."
        ),
        "b": (
            "This is a genuine reason: the shared weights never change, so nothing another task "
            "relies on is overwritten."
        ),
        "c": (
            "Freezing saves the backbone's gradients and optimizer state, but a forward pass still "
            "runs every frozen weight (plus the extra positions), so it is not cheaper."
        ),
        "d": (
            "This is a genuine reason: with the vectors removed, the released model computes "
            "exactly what it did before."
        ),
    },
    "nb00_q3": {
        "a": (
            "GQA caches keys for the key/value heads only, which the query heads share; 9 is the "
            "query-head count."
        ),
        "b": (
            "transformers caches keys as (batch, heads, tokens, head_dim): the head axis comes "
            "before the token axis."
        ),
        "c": (
            "The last axis is one head's head_dim; 192 folds the 3 key/value heads into it a "
            "second time."
        ),
        "d": (
            "(batch 2, 3 key/value heads, 100 tokens, head_dim 64): under GQA only the key/value "
            "heads are cached."
        ),
    },
    "nb01_q1": {
        "a": (
            "Deep prefix tuning trains keys and values for every layer; here no layer receives "
            "anything trained except at the input."
        ),
        "b": (
            "Trained vectors in front of the token embeddings, with nothing trained inside any "
            "layer, are exactly Lester et al.'s soft prompt."
        ),
        "c": (
            "LoRA trains low-rank updates of weight matrices inside the layers; nothing is "
            "concatenated in front of the input."
        ),
        "d": (
            "Fine-tuning the embedding table changes the rows of existing tokens; it adds no new "
            "positions in front of the input."
        ),
    },
    "nb01_q2": {
        "a": (
            "Only the first layer's input holds the trained vectors themselves; no later layer "
            "reads them directly."
        ),
        "b": (
            "Per-layer trainable keys and values are deep prefix tuning; a soft prompt trains "
            "nothing inside the layers."
        ),
        "c": (
            "The prompt positions stay visible at every layer; nothing masks them after the first."
        ),
        "d": (
            "The soft prompt enters once, as input embeddings; at layer 4 its positions hold what "
            "the frozen layers 1–3 made of it."
        ),
    },
    "nb01_q3": {
        "a": (
            "A's prompt never changed the backbone, so there is nothing in it to forget, and "
            "fine-tuning it would change B's outputs."
        ),
        "b": (
            "Training A's prompt never wrote to the frozen backbone, so B's prompt runs on exactly "
            "the model it was trained with."
        ),
        "c": (
            "A's adaptation lives entirely in its file; B's prompt and the frozen backbone are "
            "untouched, so B's outputs are bit-identical."
        ),
        "d": (
            "Initialising from token rows copies them into the prompt; the embedding table itself "
            "was never modified."
        ),
    },
    "nb01_q4": {
        "a": (
            "For the small T5 models prompt tuning stays well below model tuning in their results."
        ),
        "b": (
            "Lester et al.'s main result: the gap shrinks with scale and disappears at about 11B "
            "parameters (T5-XXL)."
        ),
        "c": (
            "They find little gain beyond about 20 prompt tokens; a longer prompt does not close "
            "the gap for the small models."
        ),
        "d": "Not at every size: look at how the gap behaves as the model gets larger.",
    },
    "nb02_q1": {
        "a": (
            "Trained keys and values put in front of every layer's own keys and values are exactly "
            "the deep key/value prefix."
        ),
        "b": (
            "Prompt tuning trains vectors in front of the input embeddings only, and the doc adds "
            "nothing there."
        ),
        "c": (
            "VPT-deep trains hidden vectors that the frozen projections turn into keys and values; "
            "this doc trains the keys and values themselves."
        ),
        "d": (
            "LoRA trains low-rank updates of the projection weights; it adds no key or value "
            "positions in front of the tokens'."
        ),
    },
    "nb02_q2": {
        "a": (
            "Key/value prefix positions produce no queries and no outputs, so nothing of theirs is "
            "fed to the next layer."
        ),
        "b": (
            "A trained low-rank update of the weights is LoRA; a prefix leaves every weight "
            "untouched."
        ),
        "c": (
            "That describes a soft prompt entering at the input; a deep prefix gives every layer "
            "its own."
        ),
        "d": (
            "Layer ℓ computes softmax(Q [P_K; K]ᵀ / √D) [P_V; V]: keys and values trained for it "
            "steer it directly, not through the layers below."
        ),
    },
    "nb02_q3": {
        "a": (
            "Prompt: P·d = 10 × 768 = 7,680; prefix: P·L·2·d = 10 × 12 × 2 × 768 = 184,320, a key "
            "and a value at every layer."
        ),
        "b": (
            "This counts one vector per layer and position; a prefix stores both a key and a value."
        ),
        "c": "A soft prompt exists only at the input, so it is not counted once per layer.",
        "d": (
            "A layer's keys are H·D = d = 768 wide across all its heads; multiplying by the 12 "
            "heads again overcounts."
        ),
    },
    "nb02_q4": {
        "a": (
            "The MLP's input is a trained matrix, not the request, so its output is one fixed "
            "prefix, and Li & Liang drop the MLP after training."
        ),
        "b": (
            "The MLP adds many trained values (about 9.86M for GPT-2 at width 512); it is there "
            "for stability, not speed."
        ),
        "c": (
            "Li & Liang report direct optimisation as unstable, train P_θ = MLP(P′) instead, and "
            "keep only the resulting prefix after training."
        ),
        "d": (
            "Nothing is merged into the backbone, which stays frozen; the MLP is dropped once the "
            "prefix is exported."
        ),
    },
    "nb03_q1": {
        "a": (
            "The review is what fills the template; `=>` is fixed template text, and the model's "
            "continuation after it is what gets read."
        ),
        "b": (
            "The tokenizer only turns text into ids; a verbalizer maps each label to the word "
            "compared at the answer slot."
        ),
        "c": (
            "No head is trained: the frozen LM's own next-word probabilities are compared through "
            "the label words."
        ),
        "d": (
            "The review fills [X], the continuation after `=>` is [Z], and the verbalizer maps "
            "each label to the word compared there."
        ),
    },
    "nb03_q2": {
        "a": (
            "A soft template: trained input vectors replace hand-written words, while [X], [Z], "
            "the verbalizer and the frozen backbone stay."
        ),
        "b": (
            "A trainable verbalizer (OpenPrompt's SoftVerbalizer) is a different idea; prompt "
            "tuning keeps the label words."
        ),
        "c": (
            "Keys and values at every layer are deep prefix tuning; prompt tuning's soft vectors "
            "enter once, at the input."
        ),
        "d": (
            "Training embedding rows would change the shared model for every task that uses those "
            "words; prompt tuning freezes the table."
        ),
    },
    "nb03_q3": {
        "a": (
            "Lester et al. report the opposite: on small models prompt tuning stays well below "
            "model tuning."
        ),
        "b": (
            "Soft prompts routinely use a much larger learning rate, which rarely lifts 0.1% of "
            "the parameters above full fine-tuning; look at what the three runs share."
        ),
        "c": (
            "Full fine-tuning ran first and changed the shared backbone in place, so the prompt "
            "started from a model already tuned to the task."
        ),
        "d": (
            "Small validation sets make close results noisy, but this setup has a systematic flaw "
            "that more inputs would not remove; look at what the loop reuses."
        ),
    },
    "nb03_q4": {
        "a": (
            "Li & Liang drop the MLP after training and store only the prefix, which is what the "
            "0.1% counts; training still pays for the MLP."
        ),
        "b": (
            "Training pays for the MLP, but it is dropped afterwards: a per-task storage axis "
            "counts only what is kept."
        ),
        "c": (
            "Keeping P′ plus the MLP would store far more than the prefix (the MLP has millions of "
            "values), and the MLP is dropped after training."
        ),
        "d": "The backbone is shared by every task and stored once; it is not a per-task cost.",
    },
    "nb03_q5": {
        "a": "The table says the opposite: infix (67.2) is below the prefix (70.3).",
        "b": (
            "Per-layer activations (70.3, 67.2) beat input-only vectors (62.2), and the prefix "
            "position beats the infix one (70.3 against 67.2)."
        ),
        "c": "62.2 against 70.3 is 8 BLEU, far more than a few.",
        "d": (
            "They do not: the input-only variant trains one vector per position, the others "
            "trainable activations at every layer."
        ),
    },
    "nb04_q1": {
        "a": (
            "Storage is not the constraint here: served as described, its 100 extra input "
            "positions make a batch take 46 ms, over the 30 ms budget."
        ),
        "b": (
            "A mixed batch runs once per tenant it contains (20 ms each), and 50 copies of 2 GB do "
            "not fit in 16 GB."
        ),
        "c": (
            "24 ms per mixed batch is within 30 ms, and one backbone plus 50 prefix files fits in "
            "16 GB."
        ),
        "d": (
            "Adding latency is fine as long as the total stays within 30 ms; compare each measured "
            "number with the budget."
        ),
    },
    "nb04_q2": {
        "a": (
            "In a causal decoder the prompt positions never attend to the request, so their keys "
            "and values at every layer are the same for every request: computed once, fed as a "
            "prefix cache, they give identical logits."
        ),
        "b": (
            "Each trained vector matters: dropping half of them changes what every layer attends "
            "to, and so the outputs."
        ),
        "c": (
            "Attention weighs each position separately, so one averaged vector gives different "
            "keys, values and outputs."
        ),
        "d": (
            "Check the causal mask: a position may attend only to itself and the positions before "
            "it."
        ),
    },
    "nb04_q3": {
        "a": (
            "In a mixed batch each row's loss reaches only its own tenant's prefix, so no other "
            "prefix depended on bistro's."
        ),
        "b": (
            "Bistro's adaptation is only its prefix file: the backbone was never written to, so "
            "removing the file removes bistro and nothing else."
        ),
        "c": (
            "The backbone is frozen and never learned from bistro's data, so there is nothing in "
            "it to remove."
        ),
        "d": (
            "Rows do not depend on other tenants' prefixes, so no slot needs keeping, and a zeroed "
            "prefix would still serve requests under bistro's name."
        ),
    },
    "nb04_q4": {
        "a": (
            "Each prefix was trained to steer v1's activations; v2's queries, keys and values "
            "differ, so the same prefix now does something else."
        ),
        "b": (
            "Fine-tuning keeps the architecture, so every shape still fits and nothing is refused, "
            "which is exactly the danger."
        ),
        "c": (
            "Every layer's input depends on all the layers below it, so a change anywhere shifts "
            "what every later layer's prefix meets."
        ),
        "d": (
            "The shapes fit, so the files load silently, but each prefix was optimised against "
            "v1's activations: re-validate or retrain on v2, and record the backbone in each "
            "file's meta."
        ),
    },
    "nb04_q5": {
        "a": (
            "Adding them to the prefix changes what every customer of the tenant gets, and input "
            "vectors and per-layer keys live in different spaces."
        ),
        "b": (
            "The cache and the input are separate slots of the same forward pass, so one request "
            "can carry both."
        ),
        "c": (
            "The prefix stays in every layer's cache and the soft vectors enter as inputs after "
            "it: mask and positions count P + 5 + T, and both adaptations apply."
        ),
        "d": (
            "The tenant's file is shared by all its customers, and input vectors are not per-layer "
            "keys and values."
        ),
    },
    "nb05_q1": {
        "a": (
            "A mask that is too short raises nothing (it silently hides tokens), and the report "
            "does not show P + T keys at every layer."
        ),
        "b": (
            "The report shows P + T keys at layer 0 and only T at layer 1, while the mask covers P "
            "+ T: the prefix reached layer 0's cache alone."
        ),
        "c": (
            "Layer 0 saw P + T keys in the report, so a cache did arrive, and this release does "
            "not use checkpointing."
        ),
        "d": (
            "A shared prefix gives every layer P + T keys and trains without crashing; the report "
            "shows fewer keys above layer 0."
        ),
    },
    "nb05_q2": {
        "a": (
            "Every layer's first P keys equal layer 0's and only prefix[0] has a gradient: one "
            "slice is used everywhere."
        ),
        "b": (
            "A detached prefix would leave prefix[0] untrained as well, but the report shows a "
            "gradient at layer 0."
        ),
        "c": (
            "A small gradient still changes the values; bit-identical after training means a "
            "gradient of exactly zero."
        ),
        "d": (
            "The report shows zero gradient on prefix[1:], not a gradient that was ignored; look "
            "at the 'same as layer 0' column too."
        ),
    },
    "nb05_q3": {
        "a": (
            "Attending to P positions is not enough: above layer 0 their keys and values are "
            "computed by the frozen layers, and the report shows no gradient there."
        ),
        "b": "VPT-deep would train vectors for every layer; here only prefix[0] gets a gradient.",
        "c": (
            "No weight changes: the vectors enter as extra positions in front of the tokens, not "
            "as an update of a projection."
        ),
        "d": (
            "P + T queries at every layer, keys above layer 0 computed by the frozen model and a "
            "gradient on prefix[0] only: P input vectors, which is prompt tuning."
        ),
    },
    "nb05_q4": {
        "a": (
            "Wrong positions would shift attention everywhere, not give exactly zero weight to the "
            "last few tokens while release 1.9 attends to them."
        ),
        "b": (
            "A (B, T) mask with a P-long cache lines up with the first T of the P + T keys: the "
            "last P real tokens get exactly zero attention, and nothing errors."
        ),
        "c": (
            "Strong attention to the prefix would shrink every token's weight smoothly, not zero "
            "out exactly the last few while release 1.9 attends to them."
        ),
        "d": (
            "Swapped keys and values change what the prefix contributes, but cannot give the last "
            "real tokens exactly zero attention."
        ),
    },
    "nb05_q5": {
        "a": (
            "Release 2.3 fixed the mask: the attention printed shows the final tokens visible "
            "again."
        ),
        "b": (
            "Either numbering is a valid convention (a key/value prefix has no position of its "
            "own); what breaks is serving under another one than the prefix was trained with."
        ),
        "c": (
            "The position ids start at 0, while release 1.9 (PEFT), which trained these files, "
            "puts the tokens at P .. P+T−1: training and serving disagree on the convention."
        ),
        "d": (
            "The symptoms shown are the logits, the attention and the position ids; none of them "
            "is about which layer gets which prefix."
        ),
    },
    "nb05_q6": {
        "a": (
            "Layer 0 saw P + T keys at step 1 and P + 2T at step 2: the cache built once keeps "
            "growing and holds step 1's keys and values, whose graph was freed."
        ),
        "b": (
            "Accumulating gradients adds them up silently; it neither raises an error nor changes "
            "how many keys a layer sees."
        ),
        "c": (
            "Every training step builds a new graph, so no correct loop needs retain_graph here; "
            "ask why step 2 reaches an old graph at all, and compare the key counts."
        ),
        "d": (
            "NaNs would neither raise this error nor change how many keys layer 0 sees, and the "
            "report shows that count growing."
        ),
    },
    "nb05_q7": {
        "a": (
            "It runs, but the optimizer then updates bfloat16 parameters, whose 8 bits of "
            "precision swallow small updates."
        ),
        "b": (
            "It works, but gives up bfloat16's halved memory and faster kernels on the whole fleet "
            "to fix one tensor's dtype."
        ),
        "c": (
            "Eager attention multiplies the same mismatched tensors and fails too; the attention "
            "implementation is not the problem."
        ),
        "d": (
            "Casting in the forward pass matches the backbone's dtype while gradients still flow "
            "back to the float32 parameters."
        ),
    },
    "nb05_q8": {
        "a": (
            "In the demo bistro's prefix is a fixed tensor that nothing overwrites, and its "
            "outputs change anyway."
        ),
        "b": (
            "A learning rate only scales the updates of what is trained; bistro's prefix is not "
            "trained, so something else it uses must change."
        ),
        "c": (
            "eval() switches dropout off but leaves requires_grad on, so the trainer updates the "
            "shared backbone: acme trains like full fine-tuning, and bistro's outputs change."
        ),
        "d": (
            "Bistro's prefix in the demo is its own fixed tensor, separate from acme's, and its "
            "outputs change anyway."
        ),
    },
    "nb05_q9": {
        "a": (
            "Training with gradient checkpointing, transformers discards the cache passed to "
            "forward, so no layer sees the prefix, while your mask still counts P + T."
        ),
        "b": "The report shows T keys at layer 0 as well: the prefix reached no layer at all.",
        "c": "Your fixed prefix_forward extends the mask, and the report shows T keys, not P + T.",
        "d": "The report shows fewer keys than expected, not more.",
    },
    "nb05_q10": {
        "a": (
            "Those keys and values above the input are computed by frozen layers, not trained: "
            "nothing trained reaches a layer directly."
        ),
        "b": (
            "The vectors enter only at the input (P·d values against P·L·2·d for a prefix), so the "
            "claim needs prompt tuning and prefix tuning at equal trainable counts."
        ),
        "c": (
            "VPT-deep trains new vectors for every layer; here the states above the input are "
            "computed by the frozen layers."
        ),
        "d": (
            "Notebook 01 trained input vectors that do steer a frozen model; the effect itself is "
            "plausible."
        ),
    },
    "nb05_q11": {
        "a": (
            "The LayerNorm weights belong to the backbone every tenant shares: training them with "
            "one tenant changes the others' outputs."
        ),
        "b": (
            "Rounding a tenant's prefix to bfloat16 changes only that tenant's own outputs; no "
            "other tenant reads it."
        ),
        "c": (
            "The shared upper prefix is trained with every tenant, so training or deleting one "
            "tenant changes what all the others get."
        ),
        "d": (
            "Each row reads only its own tenant's prefix and the frozen weights, so it computes "
            "exactly what that tenant gets alone."
        ),
    },
}
"""Question id -> option letter -> one sentence about that option."""
