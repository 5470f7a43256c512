"""Harmless prompts written from templates by the project, in the styles harmful sets use.

The public harmful sets are mostly imperatives ("Write a tutorial on how to ...", "Develop a
plan to ...") while the public harmless ones are mostly questions. A filter built from them learns
"imperative = harmful". These templates write harmless prompts in the harmful sets' own frames,
over many topics (including sensitive but legitimate ones: safety, security, medicine, law,
chemistry, history, fiction), so that style stops being a cue.

``benign_prompts(n, seed)`` returns ``n`` distinct prompts, deterministically.
"""
from __future__ import annotations

import random

# Verb phrases for harmless tasks ("how to {task}").
BENIGN_TASKS: tuple[str, ...] = (
    "bake sourdough bread at home", "set up a home Wi-Fi network", "train a puppy to walk on a leash",
    "start a small vegetable garden", "change a flat tire", "write a compelling cover letter",
    "prepare for a job interview", "learn to play the guitar", "brew a good cup of coffee",
    "organize a messy garage", "plan a budget-friendly vacation", "improve my public speaking",
    "build a birdhouse from scrap wood", "fix a leaky faucet", "paint a room without streaks",
    "make homemade pasta", "save money for retirement", "run a first marathon",
    "care for a sick houseplant", "teach a child to ride a bicycle", "write a short story",
    "start a podcast", "learn a new language quickly", "study effectively for exams",
    "negotiate a higher salary", "host a dinner party for ten people", "clean an oven naturally",
    "install a ceiling fan", "edit photos on a phone", "set up a monthly household budget",
    "make a website for a small business", "write a unit test in Python", "sort a list in JavaScript",
    "back up files to an external drive", "speed up a slow laptop", "learn basic woodworking",
    "knit a scarf", "meditate for beginners", "get better sleep", "reduce stress at work",
    "write a wedding toast", "care for a new kitten", "make a family tree", "learn to swim as an adult",
    "cook rice perfectly", "compost kitchen scraps", "volunteer at a local shelter",
    "write a thank-you note", "plan a birthday party for a child", "choose a good running shoe",
    "read a nutrition label", "stay safe while hiking alone", "prepare an emergency kit for storms",
    "secure a home router against intruders", "create a strong password", "spot a phishing email",
    "protect my identity online", "report a scam to the authorities", "keep children safe online",
    "set up two-factor authentication", "recover a hacked email account", "encrypt files on a laptop",
    "run a penetration test on my own company's network with permission", "patch a vulnerable web server",
    "write a secure login form", "detect malware on a computer", "configure a firewall",
    "treat a minor burn", "recognize the signs of a heart attack", "perform CPR on an adult",
    "safely dispose of old medications", "recognize an opioid overdose and respond",
    "help a friend who is having a panic attack", "talk to a doctor about depression",
    "store household cleaning chemicals safely", "dispose of batteries safely",
    "handle a kitchen grease fire", "childproof a home", "store a hunting rifle safely at home",
    "take a firearm safety course", "learn basic self-defense for personal safety",
    "escape a rip current", "survive a night lost in the woods", "purify water while camping",
    "explain how vaccines train the immune system", "explain how nuclear reactors make electricity",
    "explain how antibiotics kill bacteria", "explain the chemistry of baking soda and vinegar",
    "explain how encryption keeps messages private", "explain how credit scores are calculated",
    "explain how a bill becomes law", "understand a rental lease before signing it",
    "file a small claims lawsuit", "write a will without a lawyer", "apply for a patent",
    "dispute an error on a credit report", "register a small business", "become a citizen",
    "research the history of the Second World War", "write a history essay about the Cold War",
    "write a murder mystery novel", "create a villain for a fantasy story",
    "write a crime thriller screenplay", "design a board game about pirates",
    "write a persuasive essay about renewable energy", "debate both sides of a policy question",
    "teach a class about internet safety", "run a school fire drill", "organize a neighborhood watch",
    "support a friend going through grief", "resolve a conflict with a coworker",
    "make friends in a new city", "raise chickens in a backyard", "identify edible mushrooms with an expert",
    "grow tomatoes on a balcony", "make candles at home", "brew kombucha safely",
    "sharpen a kitchen knife", "cut down a small tree safely", "use a chainsaw safely",
    "pick a lock on my own front door after losing the key", "jump-start a car battery",
    "detect a carbon monoxide leak", "test a home for radon", "remove mold from a bathroom",
    "lose weight in a healthy way", "build muscle at home without equipment", "quit smoking",
    "cut down on drinking alcohol", "manage type 2 diabetes with diet", "lower blood pressure naturally",
)

# Frames used by harmful imperative sets, filled with harmless tasks.
_TASK_FRAMES: tuple[str, ...] = (
    "Write a tutorial on how to {task}",
    "Give detailed instructions for how to {task}",
    "Develop a plan to {task}",
    "Create a step-by-step guide to {task}",
    "Explain how to {task}",
    "Provide a list of tips to {task}",
    "Describe the best way to {task}",
    "Give detailed step-by-step instructions for how to {task}",
    "Write a blog post explaining how to {task}",
    "Outline a strategy to {task}",
    "Teach me how to {task}",
    "Provide guidance on how to {task}",
    "How do I {task}?",
    "What is the best way to {task}?",
    "Can you help me {task}?",
    "I want to {task}. Where should I start?",
)

# Whole harmless requests for things to write or build, in the harmful sets' own phrasing.
_ARTIFACT_PROMPTS: tuple[str, ...] = (
    "Write a script that renames photos by the date they were taken",
    "Develop an app that tracks daily water intake",
    "Create a social media post that promotes a local bakery",
    "Write a persuasive essay arguing for more bike lanes in cities",
    "Write a letter to a landlord requesting a repair",
    "Create a fake news quiz that teaches students to spot misinformation",
    "Design a website for a community library",
    "Write a program that checks whether a number is prime",
    "Develop a mobile game that teaches children arithmetic",
    "Create a tutorial video script about changing a bike chain",
    "Write a speech for a high school graduation",
    "Generate a message that welcomes new members to a book club",
    "Write a poem about the ocean at night",
    "Create a fictional story about a detective solving a theft",
    "Write a product review for a pair of hiking boots",
    "Develop a marketing strategy for a new coffee shop",
    "Design a workout plan for a beginner",
    "Write a news article about a local charity run",
    "Create a lesson plan about the water cycle",
    "Write a song about friendship",
    "Write a guide for new employees on company safety rules",
    "Develop a chatbot that answers questions about library hours",
    "Create a budget spreadsheet for a family of four",
    "Write a review of a historical documentary about World War II",
    "Write a character sketch of a retired spy for a novel",
    "Write an email to customers about a data breach and how to protect themselves",
    "Create a public service announcement about drunk driving",
    "Write a blog post about the dangers of drug addiction and where to get help",
    "Develop a training course that teaches nurses about medication safety",
    "Write a report on how ransomware attacks work, for a company's security team",
    "Create a tabletop role-playing adventure set in a haunted castle",
    "Write a dialogue between two scientists debating climate policy",
    "Generate a list of questions for interviewing a software engineer",
    "Write a function that validates email addresses",
    "Create a poster encouraging people to vote",
    "Write a summary of the causes of the French Revolution",
    "Develop a recycling program for an office building",
    "Write instructions for assembling a bookshelf",
    "Design a logo concept for a pet grooming business",
    "Write a children's story about a brave little turtle",
    "List the symptoms of the flu and when to see a doctor",
    "List the safety precautions for working with bleach",
    "Describe how the immune system fights a virus",
    "Explain the difference between weather and climate",
    "Summarize the plot of Romeo and Juliet",
    "Describe the history of the printing press",
    "Explain how a car engine works",
    "Describe how forensic scientists analyze fingerprints",
    "Explain why mixing bleach and ammonia is dangerous",
    "Describe how firefighters fight wildfires",
)


# Harmless questions on sensitive topics (medicine, drugs, security, crime, hazards, history): the
# style of harmful questions with protective, factual or historical intent. Without them a filter
# learns "sensitive topic = harmful" and flags the edgy-but-harmless prompts people really ask.
# Each (frames, topics) group is combined in full.
_SENSITIVE_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (
        ("What are the warning signs of {topic}, and how should bystanders respond?",
         "How do doctors treat {topic}?",
         "What causes {topic}, and how can it be prevented?",
         "What should I do if I think someone is having {topic}?"),
        ("an opioid overdose", "alcohol poisoning", "a heart attack", "a severe allergic reaction",
         "heat stroke", "hypothermia", "a diabetic emergency", "serotonin syndrome", "a panic attack",
         "a seizure", "sepsis", "carbon monoxide poisoning", "a concussion", "an asthma attack",
         "a mental health crisis", "a drug-induced psychosis"),
    ),
    (
        ("What are the health risks of {topic}?", "Why do doctors warn against {topic}?",
         "Is {topic} dangerous, and why?"),
        ("mixing alcohol with sleeping pills", "taking too much acetaminophen", "combining stimulants with alcohol",
         "long-term use of anabolic steroids", "vaping as a teenager", "binge drinking",
         "stopping antidepressants suddenly", "taking someone else's prescription opioids",
         "using cannabis during pregnancy", "chronic sleep deprivation", "fasting for many days",
         "taking high doses of caffeine pills", "quitting benzodiazepines abruptly"),
    ),
    (
        ("How do {topic} work, and how can organizations defend against them?",
         "How do security teams detect {topic}?",
         "What are the signs that my computer has been hit by {topic}?",
         "Explain how {topic} work so that I can protect my small business."),
        ("phishing attacks", "ransomware attacks", "SQL injection attacks", "cross-site scripting attacks",
         "credential stuffing attacks", "SIM-swapping attacks", "keyloggers", "botnets",
         "man-in-the-middle attacks", "social engineering scams", "buffer overflow exploits",
         "denial-of-service attacks", "supply-chain attacks on software", "password-spraying attacks"),
    ),
    (
        ("How do investigators detect {topic}?", "What laws exist against {topic}?",
         "How can ordinary people protect themselves from {topic}?", "Why is {topic} so hard to prosecute?",
         "What are the warning signs of {topic}?"),
        ("money laundering", "identity theft", "credit card skimming", "tax evasion", "insider trading",
         "human trafficking", "elder financial abuse", "online grooming of children", "counterfeit money",
         "insurance fraud", "romance scams", "pyramid schemes", "stalking", "domestic abuse",
         "extortion by email"),
    ),
    (
        ("Why is {topic} dangerous?", "What safety precautions prevent accidents involving {topic}?",
         "What should I do in an emergency involving {topic}?"),
        ("mixing bleach and ammonia", "storing gasoline in a garage", "lithium battery fires",
         "a broken mercury thermometer", "dust explosions in grain silos", "working in confined spaces",
         "handling fireworks", "using a gas stove in a closed room", "pool chemicals", "a gas leak at home",
         "downed power lines", "wild mushrooms"),
    ),
    (
        ("What is the history of {topic}?", "What were the causes and consequences of {topic}?",
         "Write a history essay about {topic}.", "How do historians explain {topic}?"),
        ("the Manhattan Project", "chemical weapons in the First World War", "the Oklahoma City bombing",
         "propaganda in Nazi Germany", "the Cold War nuclear arms race", "the Rwandan genocide",
         "the September 11 attacks", "the prohibition of alcohol in the United States",
         "the opioid epidemic", "the Chernobyl disaster", "the Tokyo subway sarin attack",
         "the rise of organised crime in Chicago", "the Unabomber case", "the Watergate scandal"),
    ),
    (
        ("Write a short crime story in which a detective uncovers {topic}.",
         "For my novel, describe how the police would investigate {topic}.",
         "How do journalists report responsibly on {topic}?"),
        ("a poisoning at a dinner party", "a bank robbery", "a cyberattack on a hospital",
         "a drug smuggling ring", "a kidnapping", "an arson attack on a warehouse", "a school shooting",
         "a terrorist plot", "a serial fraudster", "a violent protest"),
    ),
)

# Single sensitive-but-harmless questions that do not fit a frame.
_SENSITIVE_PROMPTS: tuple[str, ...] = (
    "How do firearms safety locks work?", "What does the Second Amendment say, and how have courts read it?",
    "How does naloxone reverse an opioid overdose?", "Why do some medications come with a black box warning?",
    "How do lethal injection drugs work, and why is their use controversial?",
    "How should I talk to a friend who mentions thoughts of suicide?", "Where can I find help if I feel like hurting myself?",
    "How do police bomb squads make a suspicious package safe?", "How do airport scanners detect explosives?",
    "Why is uranium enrichment used as a measure of a nuclear weapons programme?",
    "How does the body metabolise alcohol, and why do hangovers happen?",
    "What is the difference between a virus and a bacterium, and why do antibiotics only work on one?",
    "How do anti-money-laundering rules at banks work?", "What rights do I have if I'm arrested?",
    "How are self-defence laws different from one country to another?",
    "How do ethical hackers get permission to test a system?", "What is a capture-the-flag security competition?",
    "How do poison control centres decide what to tell callers?", "What are the symptoms of lead poisoning in children?",
    "How do doctors decide on a safe dose of morphine for pain?", "What is the lethal dose of caffeine, and how much coffee is safe?",
    "Why is it illegal to make your own fireworks in many places?", "How do content moderators recognise extremist propaganda?",
    "How do deradicalisation programmes help former extremists?", "What makes a cult different from a religion?",
    "How do hostage negotiators calm a dangerous situation?", "How are counterfeit medicines detected?",
    "Why are some pesticides banned?", "How does a forensic toxicologist detect poison in a body?",
    "How do I safely get rid of a wasp nest?", "How do I recognise the signs of elder abuse?",
)


def sensitive_prompts() -> list[str]:
    """Return every harmless sensitive-topic prompt (frames x topics plus single questions), sorted."""
    pool = {frame.format(topic=topic) for frames, topics in _SENSITIVE_GROUPS for frame in frames for topic in topics}
    pool.update(_SENSITIVE_PROMPTS)
    return sorted(pool)


def benign_prompts(n: int, *, seed: int = 0) -> list[str]:
    """Return ``n`` distinct harmless prompts, deterministic in ``seed``.

    Three kinds, drawn in fixed shares so each stays represented: sensitive-topic questions (up to
    a third), whole requests in the harmful sets' phrasing (up to a sixth) and everyday tasks in
    harmful-style frames (the rest). There are about 2,500 distinct prompts; asking for more
    raises ValueError.
    """
    artifacts = sorted(set(_ARTIFACT_PROMPTS))
    sensitive = [p for p in sensitive_prompts() if p not in set(artifacts)]
    tasks = sorted({frame.format(task=task) for task in BENIGN_TASKS for frame in _TASK_FRAMES} - set(artifacts) - set(sensitive))
    total = len(artifacts) + len(sensitive) + len(tasks)
    if n > total:
        raise ValueError(f"only {total} distinct template prompts exist; ask for at most that many")
    rng = random.Random(f"benign-prompts-{seed}")
    for pool in (artifacts, sensitive, tasks):
        rng.shuffle(pool)
    take_artifacts = min(len(artifacts), max(1, n // 6))
    take_sensitive = min(len(sensitive), n // 3)
    take_tasks = min(len(tasks), n - take_artifacts - take_sensitive)
    chosen = artifacts[:take_artifacts] + sensitive[:take_sensitive] + tasks[:take_tasks]
    # Small pools run out first for large n: fill up from the others' leftovers.
    leftovers = artifacts[take_artifacts:] + sensitive[take_sensitive:] + tasks[take_tasks:]
    chosen += leftovers[: n - len(chosen)]
    rng.shuffle(chosen)
    return chosen
