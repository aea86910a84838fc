"""
Synthetic spelling tasks over an English word list, for example "How many r are in strawberry?" -> 3.

SpellingBee: count a letter in a word, first by hand (spell the word out, walk its letters) and then
with a python tool call, so the model practises both and learns to cross-check them.
SimpleSpelling: just spell a word out, the part that makes letter counting hard for a model that
sees tokens rather than characters.

Every example is a pure function of (split, index). Preview a few with `python -m tasks.spellingbee`.
"""

import argparse
import os
import random
import string

from nanochat.common import download_file_with_lock, print0
from nanochat.data_source import announce_committed_copy, decide_on_rank0, fetch_unless_unreachable
from tasks.common import TASK_DATA_DIR, Task, check_one_of, display_path, open_text, single_turn
from tasks.gsm8k import score_final_answer

LETTERS = string.ascii_lowercase
# ~370K lowercase English words (dwyl/english-words, Unlicense)
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
COMMITTED_WORD_LIST = os.path.join(TASK_DATA_DIR, "words", "words_alpha.txt.gz")
# test seeds start above any train index, so the two splits never share an example
TEST_RANDOM_SEED_OFFSET = 10_000_000

# Phrasings of the question (data augmentation). The order is part of the data: index = rng draw.
USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    # Chinese (Simplified)
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    # Korean
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    # French
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    # Japanese
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]
QUOTES = ["", "'", '"']


def load_words():
    """
    The word list, one stripped line per word: downloaded once to <base_dir>/words_alpha.txt, or the
    committed copy when offline or (loudly) when the download fails with a network error. Rank 0 chooses.
    """
    path, reason = decide_on_rank0(lambda: fetch_unless_unreachable(
        f"Downloading the SpellingBee word list {WORD_LIST_URL}",
        lambda: download_file_with_lock(WORD_LIST_URL, "words_alpha.txt")))
    with open_text(path or COMMITTED_WORD_LIST) as f:
        words = [line.strip() for line in f]
    if path is not None:
        print0(f"Word list: {len(words):,} words from {path}")
    else:
        announce_committed_copy(f"Word list: {len(words):,} words from the committed offline copy "
                                f"{display_path(COMMITTED_WORD_LIST)} ({reason})")
    return words


def spell(word):
    """'cat' -> 'cat:c,a,t'"""
    return f"{word}:{','.join(word)}"


def manual_count_text(word, letter):
    """The by-hand solution: spell the word, then walk its letters keeping a running count."""
    text = (f"We are asked to find the number '{letter}' in the word '{word}'. "
            f"Let me try a manual approach first.\n\n"
            f"First spell the word out:\n{spell(word)}\n\n"
            f"Then count the occurrences of '{letter}':\n")
    running = 0
    for i, char in enumerate(word, 1):
        # no space between the index and the char: " a" and "a" are different tokens, and the char
        # should be the same token as in the spelled-out word above
        if char == letter:
            running += 1
            text += f"{i}:{char} hit! count={running}\n"
        else:
            text += f"{i}:{char}\n"
    return text + f"\nThis gives us {running}."


class WordTask(Task):
    """`size` examples over the word list, each a pure function of (split, index)."""

    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        check_one_of(f"{type(self).__name__} split", split, ("train", "test"))
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self):
        return self.size

    def example_rng(self, index):
        return random.Random(index if self.split == "train" else TEST_RANDOM_SEED_OFFSET + index)


class SpellingBee(WordTask):

    def get_example(self, index):
        rng = self.example_rng(index)
        # the order of the rng draws below defines the dataset: do not reorder them
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # 10%: maybe absent
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:  # people who don't use shift
            template = template.lower()
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        user_msg = template.format(letter=f"{letter_quote}{letter}{letter_quote}",
                                   word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:  # about half of people type a question mark
            user_msg += "?"

        count = word.count(letter)
        parts = [
            {"type": "text", "text": manual_count_text(word, letter)},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return single_turn(user_msg, parts)

    def evaluate(self, conversation, assistant_response):
        """1 if the response's '#### N' is the right count, else 0 (GSM8K's scoring)."""
        return score_final_answer(conversation, assistant_response)


class SimpleSpelling(WordTask):

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(size, split, **kwargs)
        random.Random(42).shuffle(self.words)  # a different word order from SpellingBee's (reference seed)

    def get_example(self, index):
        word = self.example_rng(index).choice(self.words)
        return single_turn(f"Spell the word: {word}", spell(word))

    def evaluate(self, conversation, assistant_response):
        """1 if the response is exactly the gold spelling (surrounding whitespace ignored), else 0."""
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])


def print_preview(example):
    """One example as text, tool calls shown inline as <<expr=output>>."""
    print("=" * 100)
    print(example["messages"][0]["content"])
    print("-" * 100)
    content = example["messages"][1]["content"]
    if isinstance(content, list):
        shown = {"text": "{}", "python": "<<{}=", "python_output": "{}>>"}
        content = "".join(shown[part["type"]].format(part["text"]) for part in content)
    print(content)


def main():
    parser = argparse.ArgumentParser(description="Preview SpellingBee / SimpleSpelling examples")
    parser.add_argument("--task", choices=["spellingbee", "simplespelling"], default="spellingbee")
    parser.add_argument("--split", choices=["train", "test"], default="train")
    parser.add_argument("--num-examples", type=int, default=10)
    args = parser.parse_args()
    task_class = {"spellingbee": SpellingBee, "simplespelling": SimpleSpelling}[args.task]
    for example in task_class(size=args.num_examples, split=args.split):
        print_preview(example)


if __name__ == "__main__":
    main()
