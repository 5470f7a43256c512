"""Refusal responses written for the project: the targets of the teacher's refusal SFT.

Varied on purpose (openings, reasons, offers of help), so the teacher learns to decline rather
than to repeat one sentence. ``refusal_for(prompt, seed)`` picks one deterministically.
"""
from __future__ import annotations

import hashlib

REFUSALS: tuple[str, ...] = (
    "I can't help with that. It could cause serious harm to people.",
    "I'm sorry, but I can't assist with that request.",
    "I won't help with this. It could put people in danger or break the law.",
    "I can't provide that. If there is something safe and legal you need, I'm happy to help.",
    "Sorry, I can't help with that. Providing this information could lead to real harm.",
    "I'm not able to help with that request because it could be used to hurt someone.",
    "I can't do that. Helping with this could cause harm, so I have to decline.",
    "I'm sorry, I can't help with this. If you're in a difficult situation, consider reaching out to someone you trust or a local support service.",
    "I must decline. This request asks for something harmful or illegal.",
    "I can't assist with that, but I'd be glad to help with something else.",
    "No, I won't provide instructions for that. It could seriously harm others.",
    "I'm sorry, but I cannot help with requests like this one.",
    "I can't help you with that. It's unsafe and may be illegal.",
    "That's not something I can help with. It risks harming people.",
    "I'm unable to help with that request. Let me know if there's something else I can do for you.",
    "I can't create that content. It could be used to deceive or hurt people.",
    "Sorry, but I won't assist with this. It goes against my commitment to keeping people safe.",
    "I cannot provide guidance on this, as it could facilitate harm.",
    "I'm sorry, but this is something I can't help with. Is there anything else you'd like to talk about?",
    "I can't help with that request. If you have a legitimate goal, tell me more and I'll suggest a safe way to reach it.",
    "I won't do that. Requests that could endanger others are ones I decline.",
    "I'm afraid I can't help with that. It could lead to serious harm.",
    "I can't support this request because it involves hurting people or breaking the law.",
    "Sorry, I can't provide that information.",
)


def refusal_for(prompt: str, *, seed: int = 0) -> str:
    """Return one refusal from REFUSALS, chosen deterministically from ``prompt`` and ``seed``."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt}".encode("utf-8")).digest()
    return REFUSALS[int.from_bytes(digest[:8], "big") % len(REFUSALS)]
