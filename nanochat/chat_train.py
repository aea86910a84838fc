"""
The chat stages' own training pieces; scripts/chat_sft.py and scripts/chat_rl.py are their loops.

- Both: the starting model (the parent stage's checkpoint, or this stage's to resume from) and the
  resume meta (the optimizer: training.setup_optimizer).
- SFT: the hyperparameters inherited from the base checkpoint, the data mixtures, and ChatCORE during
  training.
- RL: rollouts (seeded by step, question and sampling call, so a resumed run samples the same), the
  group-mean advantages, the token-normalised policy-gradient objective, and pass@k.
Importing this module does no work (the tasks load when a run asks for them).
"""

import math

import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat import training
from nanochat.chat_core import chatcore_metrics, run_chatcore, sampled_completions
from nanochat.checkpoint_manager import load_checkpoint_meta, load_model
from nanochat.common import (DownloadError, agree_sum, download_file_with_lock, get_dist_info, offline_mode,
                             print0)

# -----------------------------------------------------------------------------
# Both stages: where a run starts

def load_start(parent, own, args, device, phase, user_config, free_keys):
    """(model, tokenizer, (parent tag, step, meta), output tag, resume meta): the parent stage's checkpoint
    (base for SFT, sft for RL) as --model-tag/--model-step say, or with --resume-from-step s this stage's
    own checkpoint s, whose meta comes back (with a warning about flags other than free_keys that changed;
    {} for a fresh run). Output tag: --model-tag, or d<depth> of the parent."""
    parent_tag, parent_step, parent_meta = load_checkpoint_meta(parent, args.model_tag, args.model_step)
    output_tag = args.model_tag or f"d{parent_meta['model_config']['n_layer']}"
    parent_info = (parent_tag, parent_step, parent_meta)
    if args.resume_from_step < 0:
        model, tokenizer, _ = load_model(parent, device, phase=phase, model_tag=parent_tag, step=parent_step)
        return model, tokenizer, parent_info, output_tag, {}
    model, tokenizer, meta = load_model(own, device, phase=phase, model_tag=output_tag,
                                        step=args.resume_from_step)
    training.warn_on_changed_config(meta.get("user_config", {}), user_config, free_keys)
    return model, tokenizer, parent_info, output_tag, meta


# -----------------------------------------------------------------------------
# SFT: inherited hyperparameters, data mixtures, ChatCORE

# (name, fallback, where the base checkpoint's meta keeps it): --flag None inherits the pretrained value
SFT_INHERITED = [
    ("max_seq_len", 2048, "meta"),
    ("device_batch_size", 32, "meta"),
    ("total_batch_size", 524288, "meta"),
    ("embedding_lr", 0.3, "user_config"),
    ("unembedding_lr", 0.004, "user_config"),
    ("matrix_lr", 0.02, "user_config"),
]
IDENTITY_FILENAME = "identity_conversations.jsonl"


def inherit_hyperparameters(args, base_meta):
    """{name: value} for the SFT_INHERITED names: the flag if given, else the pretrained value, else the
    fallback."""
    resolved = {}
    for name, fallback, where in SFT_INHERITED:
        source = base_meta if where == "meta" else base_meta.get("user_config") or {}
        pretrained = source.get(name)
        value = getattr(args, name)  # None: the flag was not given
        if value is None:
            value = pretrained if pretrained is not None else fallback
            print0(f"Inherited {name}={value} from pretrained checkpoint")
        elif pretrained is not None and value != pretrained:
            print0(f"NOTE: --{name.replace('_', '-')}={value} overrides pretrained value of {pretrained}")
        else:
            print0(f"Using {name}={value}")
        resolved[name] = value
    return resolved


def train_mixture(mmlu_epochs, gsm8k_epochs):
    """
    The SFT training mixture. Online it is the reference's: SmolTalk train, the identity conversations
    x2, MMLU auxiliary_train x mmlu_epochs, GSM8K train x gsm8k_epochs, SimpleSpelling (200K),
    SpellingBee (80K). Offline (NANOCHAT_OFFLINE=1) SmolTalk and MMLU auxiliary_train do not exist, so it
    is built from the committed data instead: identity conversations x2, the Dolly/HH sample, GSM8K train
    (2,000 rows) x gsm8k_epochs, SimpleSpelling (2,000) and SpellingBee (800), the spelling sizes scaled
    down 100x with the rest; mmlu_epochs has no effect offline.
    """
    from tasks.common import TaskMixture
    from tasks.customjson import (COMMITTED_DOLLY_PATH, COMMITTED_IDENTITY_PATH, IDENTITY_CONVERSATIONS_URL,
                                  CustomJSON)
    from tasks.gsm8k import GSM8K
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    if offline_mode():
        identity = CustomJSON(COMMITTED_IDENTITY_PATH)
        gsm8k = GSM8K(subset="main", split="train")
        tasks = [identity, identity, CustomJSON(COMMITTED_DOLLY_PATH), *[gsm8k] * gsm8k_epochs,
                 SimpleSpelling(size=2000, split="train"), SpellingBee(size=800, split="train")]
        mixture = TaskMixture(tasks)
        print0(f"Training mixture: {len(mixture):,} rows (offline: identity x2, Dolly/HH, "
               f"GSM8K x{gsm8k_epochs}, SimpleSpelling 2,000, SpellingBee 800; no SmolTalk or MMLU "
               f"auxiliary_train)")
        return mixture
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    try:  # one rank downloads, the others wait
        identity_path = download_file_with_lock(IDENTITY_CONVERSATIONS_URL, IDENTITY_FILENAME)
    except DownloadError as e:  # the first download of an online run: say how to run without the network
        raise DownloadError(f"{e} Or set NANOCHAT_OFFLINE=1 to train on the smaller committed mixture "
                            f"(its results are not comparable with the reference's).") from e
    identity = CustomJSON(identity_path)
    mmlu = MMLU(subset="all", split="auxiliary_train")
    gsm8k = GSM8K(subset="main", split="train")
    tasks = [SmolTalk(split="train"), identity, identity, *[mmlu] * mmlu_epochs, *[gsm8k] * gsm8k_epochs,
             SimpleSpelling(size=200000, split="train"), SpellingBee(size=80000, split="train")]
    mixture = TaskMixture(tasks)
    print0(f"Training mixture: {len(mixture):,} rows (MMLU x{mmlu_epochs}, GSM8K x{gsm8k_epochs})")
    return mixture


def val_mixture():
    """SmolTalk test, MMLU test[:5200], GSM8K test[:420]: the stops keep the train proportions (reference
    values); offline there is no SmolTalk test."""
    from tasks.common import TaskMixture
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    tasks = [MMLU(subset="all", split="test", stop=5200), GSM8K(subset="main", split="test", stop=420)]
    if not offline_mode():
        from tasks.smoltalk import SmolTalk
        tasks.insert(0, SmolTalk(split="test"))
    return TaskMixture(tasks)


def log_chatcore(orig_model, tokenizer, batch_size, max_cat, max_sample, wandb_run, flops_at, step,
                 last_step=False):
    """ChatCORE during SFT: the six tasks, the ChatCORE line, and a wandb entry with each task's accuracy
    (flops_at(step): the training FLOPs so far)."""
    accuracies = run_chatcore(orig_model, tokenizer, batch_size, max_cat, max_sample)
    chatcore, chatcore_cat = chatcore_metrics(accuracies)
    print0(f"Step {step:05d} | ChatCORE: {chatcore:.4f} | ChatCORE_cat: {chatcore_cat:.4f}")
    wandb_run.log({"step": step, "total_training_flops": flops_at(step), "chatcore_metric": chatcore,
                   "chatcore_cat": chatcore_cat,
                   **{f"chatcore/{task}": acc for task, acc in accuracies.items()}})


# -----------------------------------------------------------------------------
# RL: the policy-gradient arithmetic (pure functions)

def example_index(step, example_step, examples_per_rank, rank, world_size, num_examples):
    """The training question of (step, example_step) on this rank: the rank's questions rank, rank + W, ...
    taken in order, examples_per_rank per step, cycling over the epochs."""
    rank_count = len(range(rank, num_examples, world_size))
    position = (step * examples_per_rank + example_step) % rank_count
    return rank + position * world_size


def rollout_tensors(sequences, masks, pad_id, device="cpu"):
    """(inputs, targets): sequences right-padded with pad_id (mask 0) to the longest; targets are the
    next tokens, -1 wherever the next token's mask is 0 (prompt, tool output, padding)."""
    ids = pad_sequence([torch.tensor(s) for s in sequences], batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.tensor(m) for m in masks], batch_first=True)
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    return ids[:, :-1].to(device), targets.to(device)


def group_advantages(rewards):
    """Reward minus the group mean (no division by the std): sums to zero, all zero when rewards agree."""
    return rewards - rewards.mean()


def policy_objective(logp, targets, advantages, num_passes, examples_per_rank):
    """
    sum over the pass's rows i and valid targets t of A_i * log p(y_it), divided by (valid targets in
    this pass) * passes * examples per rank: the mean over tokens (DAPO-style token-level
    normalisation), accumulated over the passes and examples of one optimizer step.
    """
    valid = targets >= 0
    num_valid = max(1, int(valid.sum().item()))
    weighted = (logp * valid) * advantages.unsqueeze(1)
    return weighted.sum() / (num_valid * num_passes * examples_per_rank)


def pass_at_k_counts(records, k_max):
    """[number of records with a correct outcome among their first k outcomes, for k = 1..k_max]."""
    counts = [0] * k_max
    for record in records:
        correct = [bool(outcome["is_correct"]) for outcome in record["outcomes"]]
        for k in range(1, k_max + 1):
            counts[k - 1] += any(correct[:k])
    return counts


# -----------------------------------------------------------------------------
# RL: rollouts of one question, and the pass@k evaluation

def rollout_example(engine, tokenizer, task, example_idx, step, args, device):
    """(sequences, inputs, targets, rewards, advantages) for args.num_samples samples of one training
    question, args.device_batch_size per sampling call. A sequence is the prompt plus its tokens and, when
    it finished, the terminal token; one cut by args.max_new_tokens has none."""
    conversation = task[example_idx]
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks, finished = [], [], []
    engine.model.eval()
    for sampling_step in range(math.ceil(args.num_samples / args.device_batch_size)):
        count = min(args.device_batch_size, args.num_samples - sampling_step * args.device_batch_size)
        seed = hash((step, example_idx, sampling_step)) & 0x7FFFFFFF  # stable: hashes of int tuples
        s, m, f = engine.generate_batch(prompt, count, keep_terminal=True, max_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, seed=seed)
        sequences += s
        masks += m
        finished += f
    rewards = []
    for seq, done in zip(sequences, finished):
        completion = seq[len(prompt):len(seq) - 1] if done else seq[len(prompt):]
        rewards.append(task.reward(conversation, tokenizer.decode(completion)))
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    inputs, targets = rollout_tensors(sequences, masks, assistant_end, device)
    rewards = torch.tensor(rewards, dtype=torch.float, device=device)
    return sequences, inputs, targets, rewards, group_advantages(rewards)


def evaluate_pass_at_k(task, tokenizer, engine, max_examples, num_samples, device, max_new_tokens, top_k,
                       temperature=1.0):
    """{k: pass@k for k = 1..num_samples} over the first max_examples test questions, split over the ranks."""
    _, rank, _, world_size = get_dist_info()
    engine.model.eval()
    indices = range(rank, min(max_examples, len(task)), world_size)
    samples = sampled_completions(task, tokenizer, engine, indices, num_samples, max_new_tokens, temperature,
                                  top_k)
    records = [{"outcomes": [{"is_correct": task.evaluate(conversation, c)} for c in completions]}
               for conversation, completions in samples]
    *counts, num_records = agree_sum(pass_at_k_counts(records, num_samples) + [len(records)], device)
    return {k: count / max(1, num_records) for k, count in enumerate(counts, 1)}
