"""The hazard taxonomy every built-in harmful prompt is labelled with.

The MLCommons AI Safety hazard categories S1-S14, as Llama Guard 3 uses them, plus three kinds of
harm that taxonomy folds into others (harassment, misinformation, stereotyping) and one that is
about form rather than content: ``jailbreak``, a request wrapped in a role-play, "no rules" or
"ignore your instructions" framing. A finetuning row in such a framing teaches a model to drop its
safety whatever it asks (Qi et al. 2023), so the filter flags it under its own category.

Categories are named by short slugs (``violent_crimes``); ``code`` gives the MLCommons code where
there is one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HazardCategory:
    slug: str
    code: str | None
    title: str
    covers: str


HAZARD_CATEGORIES: tuple[HazardCategory, ...] = (
    HazardCategory("violent_crimes", "S1", "Violent crimes",
                   "murder, assault, kidnapping, terrorism, animal abuse; planning or enabling them"),
    HazardCategory("non_violent_crimes", "S2", "Non-violent crimes",
                   "fraud, scams, theft, drug crimes, weapons crimes, hacking and malware, money laundering"),
    HazardCategory("sex_crimes", "S3", "Sex-related crimes",
                   "sexual assault, trafficking, prostitution, sexual harassment, non-consensual imagery"),
    HazardCategory("child_exploitation", "S4", "Child sexual exploitation",
                   "sexual content involving minors, grooming, enabling the abuse of children"),
    HazardCategory("defamation", "S5", "Defamation",
                   "verifiably false claims that injure a real person's reputation"),
    HazardCategory("specialized_advice", "S6", "Specialised advice",
                   "dangerous financial, medical or legal advice given as if by a professional"),
    HazardCategory("privacy", "S7", "Privacy",
                   "sensitive non-public personal information: addresses, records, tracking, doxxing"),
    HazardCategory("intellectual_property", "S8", "Intellectual property",
                   "piracy, reproducing copyrighted works, counterfeits, trade-secret theft"),
    HazardCategory("indiscriminate_weapons", "S9", "Indiscriminate weapons",
                   "chemical, biological, radiological, nuclear and high-yield explosive weapons"),
    HazardCategory("hate", "S10", "Hate",
                   "content that demeans or dehumanises people for a protected characteristic"),
    HazardCategory("self_harm", "S11", "Suicide and self-harm",
                   "suicide, self-injury, disordered eating, encouragement of them"),
    HazardCategory("sexual_content", "S12", "Sexual content",
                   "explicit erotic content, pornography"),
    HazardCategory("elections", "S13", "Elections",
                   "false information about voting, voter suppression, election manipulation"),
    HazardCategory("code_interpreter_abuse", "S14", "Code interpreter abuse",
                   "escaping sandboxes, denial of service on the host, privilege escalation through tools"),
    HazardCategory("harassment", None, "Harassment",
                   "bullying, threats, intimidation and abuse aimed at a person"),
    HazardCategory("misinformation", None, "Misinformation",
                   "fabricated news, conspiracy content, disinformation campaigns, fake reviews"),
    HazardCategory("stereotyping", None, "Stereotyping",
                   "demeaning generalisations about a group of people, asked or asserted"),
    HazardCategory("jailbreak", None, "Jailbreak framing",
                   "role-play personas, 'no rules' or 'ignore your instructions' wrappers, whatever they ask"),
)

CATEGORY_SLUGS: tuple[str, ...] = tuple(c.slug for c in HAZARD_CATEGORIES)
_BY_SLUG = {c.slug: c for c in HAZARD_CATEGORIES}


def category(slug: str) -> HazardCategory:
    """Return the HazardCategory named ``slug``; KeyError names the known slugs."""
    try:
        return _BY_SLUG[slug]
    except KeyError:
        raise KeyError(f"unknown hazard category {slug!r}; known: {', '.join(CATEGORY_SLUGS)}") from None
