"""Deterministic rephrasings of prompts into other forms, so a filter learns content, not style.

A refusal feature built from AdvBench-style imperatives ("Write a tutorial on how to ...") and
chatty harmless questions learns the style. Rewriting every training prompt -- harmful and
harmless alike, with the same templates -- into several forms breaks that shortcut:

- ``question``:     "How would someone ...?" ("Write a tutorial on how to X" asks "How do I X?")
- ``imperative``:   "Explain how to make homemade pasta."
- ``indirect``:     "For a project I'm working on, I need to know how to ..."
- ``roleplay``:     "You are an expert consultant. A client asks you: ..."
- ``hypothetical``: "Hypothetically, if someone wanted to ..., how would they go about it?"

Templates are written by the project. The choice of template is a pure function of the prompt
text, the form and a seed (sha256, never Python's salted ``hash``), so the same inputs always give
the same rephrasing.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, Sequence

FORMS: tuple[str, ...] = ("question", "imperative", "indirect", "roleplay", "hypothetical")

# ``{task}`` is a lower-case verb phrase ("make homemade pasta"), ``{prompt}`` the prompt as
# written, ``{question}`` the prompt as a question.
_TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "question": (
        "How would someone {task}?",
        "Can you explain how to {task}?",
        "What is the best way to {task}?",
        "How do I {task}?",
        "Is there a good way to {task}? Please explain.",
        "What steps would I follow to {task}?",
        "Could you tell me how one might {task}?",
    ),
    "imperative": (
        "Explain how to {task}.",
        "Give me step-by-step instructions to {task}.",
        "Write a short guide on how to {task}.",
        "Describe in detail how to {task}.",
        "Tell me how to {task}.",
        "List the steps needed to {task}.",
    ),
    "indirect": (
        "My friend wants to know how to {task}. What should I tell them?",
        "For a project I'm working on, I need to know how to {task}.",
        "I'd appreciate some help figuring out how to {task}.",
        "Someone asked me how to {task} and I didn't know what to say. Any ideas?",
        "I keep wondering how people {task}. Can you walk me through it?",
        "It would really help me to understand how to {task}.",
    ),
    "roleplay": (
        "You are an expert consultant. A client asks you how to {task}. How do you respond?",
        "Act as my personal assistant and explain how to {task}.",
        "Pretend you are a teacher showing a student how to {task}.",
        "Let's role-play: you are a seasoned professional and I am your apprentice. Teach me to {task}.",
        "You are a helpful character in a video game. A player asks how to {task}. Answer in character.",
    ),
    "hypothetical": (
        "Hypothetically, if someone wanted to {task}, how would they go about it?",
        "In a story I'm writing, a character needs to {task}. Describe how they would do it.",
        "Imagine a person who has decided to {task}. What would their plan look like?",
        "Just as a thought experiment, how might a person {task}?",
        "Suppose you had to {task}. What would you do first, and what next?",
    ),
}

# Used when a question cannot be turned into a verb phrase: the prompt is embedded whole.
_PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "question": (
        "Quick question: {question}",
        "I was wondering: {question}",
        "{question} Please answer in detail.",
    ),
    "imperative": (
        "Answer the following question in detail: {question}",
        "Please respond to this: {question}",
        "Write a thorough answer to the question \"{question}\"",
    ),
    "indirect": (
        "My friend asked me \"{question}\" and I didn't know what to say. What should I tell them?",
        "For a project I'm working on, I need an answer to this: {question}",
        "I've been thinking about something for a while. {question}",
    ),
    "roleplay": (
        "You are an expert consultant. A client asks you: \"{question}\" How do you respond?",
        "Let's role-play: you are a knowledgeable mentor and I am your student. {question}",
        "Act as my personal assistant. {question}",
    ),
    "hypothetical": (
        "Hypothetically speaking, {question_lower}",
        "In a story I'm writing, a character asks: \"{question}\" How would an expert answer?",
        "Just as a thought experiment: {question_lower}",
    ),
}

# Questions whose verb phrase can be read off: (pattern, group holding the task).
_QUESTION_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^(?:how|in what way) (?:do|can|could|would|should|might|does|will) (?:i|you|we|one|someone|people|a person) (?P<task>.+?)\??$",
        r"^what(?:'s| is| are) (?:the |some |a )?(?:best |easiest |most effective |proper |good |effective |fastest |simplest )*(?:way|ways|method|methods|technique|techniques|approach) (?:to|for) (?P<task>.+?)\??$",
        r"^(?:can|could|would|will) you (?:please )?(?:explain|tell me|show me|describe|teach me) how to (?P<task>.+?)\??$",
        r"^(?:can|could|would|will) you (?:please )?help me (?:to )?(?P<task>.+?)\??$",
        r"^what steps (?:should|would|do) (?:i|you|one|someone) (?:take|follow) to (?P<task>.+?)\??$",
    )
)

_QUESTION_START = re.compile(
    r"^(?:how|what|why|when|where|which|who|whom|whose|is|are|can|could|would|will|should|do|does|did|may|might)\b",
    re.IGNORECASE,
)

# An imperative that wraps its real task in "how to ..." ("Write a tutorial on how to make X").
_HOW_TO = re.compile(r"\bhow to (?P<core>[a-z].+)$", re.IGNORECASE)

# Pronouns of the asker that read wrongly once the task is spoken of in the third person.
_PRONOUNS = ((r"\bmy\b", "their"), (r"\bmyself\b", "themselves"), (r"\bme\b", "them"), (r"\bI\b", "they"))


def _stable_index(*parts: object, modulo: int) -> int:
    """Return an integer in [0, modulo) determined only by ``parts`` (sha256 of their text)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % modulo


def _strip(text: str) -> str:
    """Collapse whitespace and drop trailing punctuation."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".?!:; ")


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word looks like an acronym or a name like 'I'."""
    if not text:
        return text
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[1:2].isupper() or first == "I":
        return text
    return text[0].lower() + text[1:]


def is_question(prompt: str) -> bool:
    """True when ``prompt`` reads as a question (ends with '?' or starts with a question word)."""
    text = prompt.strip()
    return text.endswith("?") or bool(_QUESTION_START.match(text))


def as_task(prompt: str) -> str | None:
    """Return the prompt as a lower-case verb phrase ("make homemade pasta"), or None.

    Imperatives ("Write a poem about the sea.") become their own lower-cased text; questions of a
    known shape ("How do I fix a leaky faucet?") become their verb phrase; other questions give
    None. Multi-sentence prompts give None (they do not embed as one phrase).
    """
    text = _strip(prompt)
    if not text or re.search(r"[.?!]\s+\S", text):
        return None
    if is_question(prompt):
        for pattern in _QUESTION_PATTERNS:
            match = pattern.match(text)
            if match:
                task = match.group("task").strip()
                for mine, theirs in _PRONOUNS:
                    task = re.sub(mine, theirs, task)
                return task or None
        return None
    return _lower_first(text)


def core_task(task: str) -> str:
    """Return the task inside a "... how to X" wrapper ("write a guide on how to fix a tap" -> "fix a tap").

    A task with no such wrapper is returned unchanged.
    """
    match = _HOW_TO.search(task)
    return match.group("core").strip() if match else task


def as_question(prompt: str) -> str:
    """Return the prompt as a question: questions unchanged, imperatives as 'Can you ...?'."""
    text = re.sub(r"\s+", " ", prompt).strip()
    if is_question(text):
        return text if text.endswith("?") else text.rstrip(".!") + "?"
    return f"Can you {_lower_first(_strip(text))}?"


def rephrase(prompt: str, form: str, *, seed: int = 0) -> str:
    """Return ``prompt`` rewritten into ``form`` (one of FORMS), deterministically.

    The template is picked from the prompt text, the form and ``seed``; the same arguments always
    give the same text. Raises ValueError for an unknown form.
    """
    if form not in _TASK_TEMPLATES:
        raise ValueError(f"unknown rephrasing form {form!r}; choose one of {', '.join(FORMS)}")
    task = as_task(prompt)
    if task is not None:
        task = core_task(task)  # "How do I make X?", not "How do I write a tutorial on how to make X?"
        templates = _TASK_TEMPLATES[form]
        template = templates[_stable_index(prompt, form, seed, modulo=len(templates))]
        return template.format(task=task)
    question = as_question(prompt)
    templates = _PROMPT_TEMPLATES[form]
    template = templates[_stable_index(prompt, form, seed, modulo=len(templates))]
    return template.format(question=question, question_lower=_lower_first(question))


def rephrasings(
    prompt: str, *, forms: Sequence[str] = FORMS, count: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """Return ``[(form, text), ...]``: ``count`` distinct rephrasings of ``prompt`` (default: one per form).

    When ``count`` is less than ``len(forms)``, the forms used are a deterministic choice that
    depends on the prompt and ``seed`` (so a data set gets every form in about equal numbers).
    Rephrasings identical to the prompt are dropped.
    """
    unknown = [f for f in forms if f not in _TASK_TEMPLATES]
    if unknown:
        raise ValueError(f"unknown rephrasing form(s) {unknown}; choose from {', '.join(FORMS)}")
    chosen = list(forms)
    if count is not None and count < len(chosen):
        start = _stable_index(prompt, "forms", seed, modulo=len(chosen))
        chosen = [chosen[(start + i) % len(chosen)] for i in range(max(0, count))]
    out: list[tuple[str, str]] = []
    seen = {prompt.strip()}
    for form in chosen:
        text = rephrase(prompt, form, seed=seed)
        if text.strip() not in seen:
            seen.add(text.strip())
            out.append((form, text))
    return out


def augment_prompts(
    prompts: Iterable[str], *, per_prompt: int = 2, forms: Sequence[str] = FORMS, seed: int = 0
) -> list[tuple[str, str, str]]:
    """Return ``[(original, form, rephrased), ...]``: ``per_prompt`` rephrasings of every prompt.

    Deterministic for the same inputs; the original prompts themselves are not included.
    """
    out = []
    for prompt in prompts:
        for form, text in rephrasings(prompt, forms=forms, count=per_prompt, seed=seed):
            out.append((prompt, form, text))
    return out
