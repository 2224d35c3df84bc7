"""Realistic synthetic ChatGPT and Claude.ai exports, for tests, demos and benchmarks.

The shapes and proportions follow what real exports look like (see the
"Real ChatGPT exports" notes in shared/ENVIRONMENT.md): conversation trees with
regenerations and edits, hidden system messages, custom instructions, images,
tool traffic, reasoning, citation markers, non-ASCII text, and the odd huge
message or conversation. Output is streamed one conversation at a time and is
byte-identical for the same arguments.

The committed demo sample is regenerated with::

    write_sample_export(SAMPLE_PATH)
    # == write_synthetic_export(SAMPLE_PATH, size_mb=0.12, seed=7, demo=True)
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("chatgpt", "chatgpt-sharded", "claude")
MB = 1_000_000  # size_mb counts decimal megabytes
CLAUDE_ROOT = "00000000-0000-4000-8000-000000000000"
SAMPLE_PATH = Path(__file__).resolve().parent.parent / "data" / "sample_export.json"
SAMPLE_SIZE_MB = 0.12
SAMPLE_SEED = 7
SHARD_MAX_MB = 45.0  # real shards stay under ~50 MB

# Export time span: conversations are written newest first, walking back in time.
_T_NEWEST = 1_780_000_000.0  # 2026-05
_T_OLDEST = 1_673_000_000.0  # 2023-01
_ERA1_START = 1_685_000_000.0  # 2023-05: conversation_id and message status appear
_ERA2_START = 1_735_000_000.0  # 2025-01: channels, thoughts, web.run


@dataclass(frozen=True)
class SynthStats:
    """What write_synthetic_export wrote."""

    path: str
    format: str
    bytes: int
    conversations: int
    messages: int
    seconds: float
    no_dialogue: int = 0  # conversations deliberately left without any user/assistant exchange

    @property
    def mb_per_s(self) -> float:
        """Write throughput in decimal megabytes per second."""
        return self.bytes / MB / self.seconds if self.seconds > 0 else float("inf")


def write_synthetic_export(
    path, *, size_mb: float, format: str = "chatgpt", seed: int = 0, demo: bool = False
) -> SynthStats:
    """Write a synthetic export of about size_mb (±5%) to path; same arguments give the same bytes.

    Args:
        path: a file for "chatgpt" and "claude"; a folder for "chatgpt-sharded".
        format: "chatgpt", "chatgpt-sharded" or "claude".
        demo: short messages and small conversations, for a tiny model summarizing on CPU.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if size_mb <= 0:
        raise ValueError(f"size_mb must be positive, got {size_mb}")
    started = time.perf_counter()
    path = Path(path)
    rng = random.Random(seed)
    target = int(size_mb * MB)
    pool = _TextPool(random.Random(seed * 7919 + 1), demo=demo)
    if format == "claude":
        builder = _ClaudeBuilder(rng, pool, demo=demo)
    else:
        builder = _ChatGPTBuilder(rng, pool, sharded=format == "chatgpt-sharded", demo=demo)
    plan = _Plan(rng, target, demo=demo)

    if format == "chatgpt-sharded":
        path.mkdir(parents=True, exist_ok=True)
        n_shards = max(2, math.ceil(size_mb / SHARD_MAX_MB))
        names = [f"conversations-{i:03d}.json" for i in range(n_shards)]
        manifest_guess = 120 + 30 * n_shards  # reserve room so the manifest doesn't push the total over
        total = 0
        for i, name in enumerate(names):
            shard_target = (target - manifest_guess - total) // (n_shards - i)
            total += _write_list(path / name, builder, plan, shard_target)
        manifest = {"format": "chatgpt-sharded", "version": 1, "files": names,
                    "conversation_count": plan.conversations}
        blob = json.dumps(manifest, indent=2).encode()
        (path / "export_manifest.json").write_bytes(blob)
        total += len(blob)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        total = _write_list(path, builder, plan, target)

    stats = SynthStats(str(path), format, total, plan.conversations, plan.messages,
                       time.perf_counter() - started, plan.no_dialogue)
    logger.debug("wrote %s: %d bytes, %d conversations, %.1f MB/s",
                 path, total, stats.conversations, stats.mb_per_s)
    return stats


def write_sample_export(path=SAMPLE_PATH) -> SynthStats:
    """Regenerate the committed demo sample (apiana_lab/data/sample_export.json) exactly."""
    return write_synthetic_export(path, size_mb=SAMPLE_SIZE_MB, format="chatgpt", seed=SAMPLE_SEED, demo=True)


# ---------------------------------------------------------------------------
# Writing: stream conversations into a JSON list until the byte budget is used.


class _Plan:
    """The byte budget, the clock walking back through the export, and the running counts."""

    def __init__(self, rng: random.Random, target: int, *, demo: bool):
        self.rng = rng
        self.target = target
        self.demo = demo
        self.written = 0
        self.conversations = 0
        self.messages = 0
        self.no_dialogue = 0
        self.big_done = 0

    def next_time(self) -> float:
        """Newest first: the share of the budget already written says how far back in 2026-2023 we are."""
        span = _T_NEWEST - _T_OLDEST
        return _T_NEWEST - span * min(1.0, self.written / self.target) - self.rng.uniform(0, 0.02 * span)

    def conversation_size(self, remaining: int) -> int:
        """A target size in bytes: mostly 6-170 KB, a few over 1 MB, the last one fills the budget."""
        rng = self.rng
        if self.demo:
            size = int(rng.uniform(6_000, 13_000))
        else:
            size = int(min(400_000, max(4_500, rng.lognormvariate(math.log(16_000), 0.95))))
            # Guarantee a huge conversation in any export big enough to hold one comfortably.
            big_room = self.target >= 4 * MB and remaining > 1_900_000
            if big_room and (rng.random() < 0.0015 or (self.big_done == 0 and self.written > 0.25 * self.target)):
                size = int(rng.uniform(1.1, 1.6) * MB)
                self.big_done += 1
        if remaining - size < 4_000:
            size = remaining
        return size


def _write_list(path: Path, builder, plan: _Plan, target: int) -> int:
    """Write one JSON list of conversations of about target bytes; return the bytes written."""
    encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode
    written = 0
    with open(path, "wb") as fh:
        fh.write(b"[")
        written += 1
        first = True
        # Stop when what is left is smaller than the smallest conversation we would make.
        while target - written - 1 > 1_500 or first:
            remaining = target - written - 1
            size = plan.conversation_size(remaining)
            for _ in range(3):
                conv, n_messages, dialogue = builder.conversation(size, plan.next_time(), plan.conversations)
                blob = encode(conv).encode()
                builder.learn(len(blob))
                # Only the last conversation can overshoot the budget; rebuild it smaller.
                if len(blob) <= remaining + max(600, target // 100) or size < 3_000:
                    break
                size = int(size * remaining / len(blob) * 0.97)
            if not first:
                fh.write(b", ")
                written += 2
            fh.write(blob)
            written += len(blob)
            first = False
            plan.conversations += 1
            plan.messages += n_messages
            plan.no_dialogue += not dialogue
            plan.written += len(blob)
        fh.write(b"]")
        written += 1
    return written


# ---------------------------------------------------------------------------
# Vocabulary. Each topic gives noun phrases, verb phrases, goals, problems (clauses)
# and fixes (imperatives) that the templates below combine into natural sentences.

_TOPICS = (
    dict(titles=("Sourdough Starter Troubleshooting", "Dense Sourdough Loaf", "Bread Baking Schedule"),
         things=("the starter", "the levain", "hydration", "the bulk ferment", "the crumb", "the Dutch oven",
                 "the shaping step", "whole wheat flour", "the autolyse"),
         actions=("feed the starter twice a day", "shape the dough more tightly", "score the loaf",
                  "proof the dough in the fridge overnight", "preheat the Dutch oven for 45 minutes",
                  "do a few sets of stretch and folds"),
         goals=("bake a loaf with a more open crumb", "get a more sour flavor", "fit baking around a work week",
                "get a better oven spring"),
         problems=("the loaf comes out dense and gummy", "the dough spreads flat on the counter",
                   "the starter smells like nail polish remover", "the crust burns before the inside is done"),
         fixes=("lower the hydration to about 70% until shaping feels easier", "let the bulk ferment go a bit longer",
                "feed the starter at a 1:5:5 ratio", "bake the last 15 minutes with the lid off at a lower temperature")),
    dict(titles=("Asyncio Tasks Not Running", "Python Async Scraper", "Async vs Threads in Python"),
         things=("the event loop", "asyncio.gather", "a semaphore", "the aiohttp session", "a blocking call",
                 "the task group", "a timeout", "the thread pool"),
         actions=("wrap the blocking call in asyncio.to_thread", "create one session and reuse it",
                  "limit concurrency with a semaphore", "await every task you create",
                  "add a timeout around each request", "use a TaskGroup instead of bare create_task"),
         goals=("scrape a few thousand pages without getting blocked", "speed up my API client",
                "understand when async actually helps", "shut the program down cleanly"),
         problems=("the script hangs at the end", "I get 'Task was destroyed but it is pending'",
                   "everything runs one at a time anyway", "memory keeps growing"),
         fixes=("make sure nothing inside the coroutine calls time.sleep", "cancel pending tasks before closing the loop",
                "cap the number of in-flight requests at around 20", "close the session in a finally block"),
         code=(("import asyncio\n"
                "import aiohttp\n"
                "\n"
                "async def fetch(session, url, sem):\n"
                "    async with sem:\n"
                "        async with session.get(url, timeout=10) as resp:\n"
                "            return await resp.text()\n"
                "\n"
                "async def main(urls):\n"
                "    sem = asyncio.Semaphore(20)\n"
                "    async with aiohttp.ClientSession() as session:\n"
                "        return await asyncio.gather(*(fetch(session, u, sem) for u in urls))\n"),
               ("async def worker(queue):\n"
                "    while True:\n"
                "        item = await queue.get()\n"
                "        try:\n"
                "            await process(item)\n"
                "        finally:\n"
                "            queue.task_done()\n")),
         lang="python"),
    dict(titles=("Two Weeks in Japan Itinerary", "Lisbon Weekend Plan", "Budget Trip to Portugal"),
         things=("the rail pass", "the itinerary", "the hotel near the station", "day trips", "the local buses",
                 "the budget", "travel insurance", "the old town"),
         actions=("book the first and last nights in advance", "buy a regional rail pass", "leave one free day",
                  "group the sights by neighborhood", "start early to avoid the crowds", "carry some cash"),
         goals=("see the highlights without rushing", "keep the trip under $2,500", "travel with two kids comfortably",
                "mix cities and nature"),
         problems=("the itinerary feels way too packed", "hotels near the center are very expensive",
                   "the trains between the two cities take longer than I expected", "it rains most of that week"),
         fixes=("cut one city and spend the extra day on a slow walk through the old town",
                "stay one stop outside the center and take the metro in", "plan museums for the rainy afternoons",
                "book the long train rides for the morning")),
    dict(titles=("First Marathon Training Plan", "Running Pace Zones", "Shin Splints While Running"),
         things=("the long run", "easy pace", "weekly mileage", "the taper", "interval sessions", "recovery days",
                 "running shoes", "strength training"),
         actions=("run most miles at an easy, conversational pace", "increase weekly mileage by about 10%",
                  "add one interval session a week", "take a full rest day after the long run",
                  "practice fueling on long runs", "do two short strength sessions a week"),
         goals=("finish my first marathon in under four hours", "run a faster 10K", "stay injury-free this season",
                "build up to running five days a week"),
         problems=("my shins hurt after every run", "I'm exhausted for days after the long run",
                   "my pace isn't improving", "I get side stitches halfway through"),
         fixes=("slow the easy runs down by 30-60 seconds per mile", "swap one run for cycling for two weeks",
                "replace shoes that have more than 500 miles on them", "eat something small about 90 minutes before running")),
    dict(titles=("Kubernetes CrashLoopBackOff", "Helm Chart for Staging", "K8s Resource Limits"),
         things=("the readiness probe", "the deployment", "resource limits", "the ConfigMap", "the ingress",
                 "the service account", "the Helm values file", "the rollout"),
         actions=("check the pod logs with kubectl logs --previous", "set memory requests and limits",
                  "add a readiness probe", "move the config into a ConfigMap", "roll back with helm rollback",
                  "describe the pod to see the events"),
         goals=("deploy the API to staging without downtime", "stop pods from getting OOMKilled",
                "set up a simple CI deploy", "understand why the rollout is stuck"),
         problems=("the pod is stuck in CrashLoopBackOff", "the rollout never finishes",
                   "requests fail for a few seconds during each deploy", "the node runs out of memory"),
         fixes=("raise the memory limit and watch actual usage for a day", "fix the probe path so it matches the health endpoint",
                "set maxUnavailable to 0 in the rolling update strategy", "give the app a longer initialDelaySeconds"),
         code=(("apiVersion: apps/v1\n"
                "kind: Deployment\n"
                "metadata:\n"
                "  name: api\n"
                "spec:\n"
                "  replicas: 3\n"
                "  strategy:\n"
                "    rollingUpdate:\n"
                "      maxUnavailable: 0\n"
                "  template:\n"
                "    spec:\n"
                "      containers:\n"
                "        - name: api\n"
                "          image: registry.example.com/api:1.4.2\n"
                "          resources:\n"
                "            requests: {memory: 256Mi, cpu: 100m}\n"
                "            limits: {memory: 512Mi}\n"
                "          readinessProbe:\n"
                "            httpGet: {path: /healthz, port: 8080}\n"),),
         lang="yaml"),
    dict(titles=("Monthly Budget Spreadsheet", "Paying Off Credit Card Debt", "Emergency Fund Planning"),
         things=("the emergency fund", "fixed costs", "the 50/30/20 rule", "the credit card balance",
                 "automatic transfers", "subscriptions", "the savings account", "irregular expenses"),
         actions=("list every fixed cost first", "automate a transfer on payday", "cancel subscriptions you haven't used",
                  "pay the highest-interest card first", "set aside a small amount for irregular expenses",
                  "review spending once a week"),
         goals=("save three months of expenses", "pay off $6,000 of card debt this year", "stop running out of money before payday",
                "start investing a little every month"),
         problems=("I always overspend on food", "unexpected bills wipe out my savings",
                   "I lose track of small purchases", "my income changes a lot month to month"),
         fixes=("budget from last month's income instead of this month's", "keep a separate account for bills",
                "give yourself a fixed weekly amount for groceries and eating out", "round every purchase up into savings")),
    dict(titles=("Learning Spanish Faster", "Spanish Subjunctive Help", "Language Exchange Tips"),
         things=("the subjunctive", "listening practice", "spaced repetition", "a language exchange partner",
                 "the preterite", "vocabulary lists", "podcasts", "speaking practice"),
         actions=("practice speaking for ten minutes every day", "learn words in full sentences",
                  "shadow short podcast clips", "write a short journal entry in Spanish", "review flashcards every morning",
                  "find a conversation partner online"),
         goals=("hold a basic conversation before my trip", "finally understand the subjunctive",
                "pass the B1 exam", "understand native speakers on TV"),
         problems=("I freeze up when I have to speak", "I forget new words after a few days",
                   "native speakers talk way too fast for me", "I mix up the preterite and the imperfect"),
         fixes=("use spaced repetition instead of rereading lists", "watch shows with Spanish subtitles, not English ones",
                "memorize a few fixed phrases for the situations you'll actually face", "focus on one tense per week")),
    dict(titles=("Monstera Leaves Turning Yellow", "Houseplants for Low Light", "Repotting a Fiddle Leaf Fig"),
         things=("the potting mix", "drainage", "indirect light", "the watering schedule", "the roots",
                 "humidity", "fertilizer", "the pot size"),
         actions=("check the soil with your finger before watering", "move the plant closer to a bright window",
                  "repot into a pot one size larger", "add perlite to the potting mix", "wipe the leaves once a month",
                  "fertilize lightly during spring and summer"),
         goals=("keep my plants alive while traveling", "get more new leaves this year", "grow plants in a dark apartment",
                "propagate a few cuttings"),
         problems=("the lower leaves keep turning yellow", "the soil stays wet for a week", "there are tiny flies around the pot",
                   "the stems are getting long and floppy"),
         fixes=("let the top few centimeters dry out between waterings", "switch to a pot with a drainage hole",
                "water from the bottom for a while", "give it more light rather than more fertilizer")),
    dict(titles=("Software Engineer Resume Review", "Behavioral Interview Prep", "Cover Letter Draft"),
         things=("the summary section", "the STAR method", "quantified results", "the cover letter", "the portfolio",
                 "the recruiter screen", "the take-home assignment", "references"),
         actions=("lead each bullet with a strong verb", "add numbers to your biggest achievements",
                  "tailor the resume to each job posting", "prepare five stories using the STAR method",
                  "research the company's recent news", "practice answers out loud"),
         goals=("land interviews for senior roles", "switch careers into data analysis", "get past the recruiter screen",
                "negotiate a better offer"),
         problems=("I'm not getting any callbacks", "my resume is three pages long", "I ramble in behavioral interviews",
                   "I don't know how to explain a gap in my work history"),
         fixes=("cut anything older than ten years down to one line", "keep each answer to about two minutes",
                "mention the gap briefly and move on to what you did since", "put the most relevant project at the top")),
    dict(titles=("Slow SQL Query Optimization", "Postgres Index Help", "SQL Window Functions"),
         things=("the query plan", "a composite index", "the WHERE clause", "window functions", "the join order",
                 "a CTE", "table statistics", "the LIMIT"),
         actions=("run EXPLAIN ANALYZE on the query", "add a composite index on the filter columns",
                  "rewrite the subquery as a join", "update the table statistics", "select only the columns you need",
                  "use a window function instead of a self-join"),
         goals=("make the report query run in under a second", "find duplicate rows", "rank customers by revenue per month",
                "understand why Postgres ignores my index"),
         problems=("the query takes 40 seconds on the production table", "the planner does a sequential scan",
                   "the results have duplicates after the join", "the query gets slower every week"),
         fixes=("put the most selective column first in the index", "filter before joining instead of after",
                "run ANALYZE after large imports", "replace OFFSET pagination with keyset pagination"),
         code=(("SELECT customer_id,\n"
                "       date_trunc('month', ordered_at) AS month,\n"
                "       sum(total) AS revenue,\n"
                "       rank() OVER (PARTITION BY date_trunc('month', ordered_at) ORDER BY sum(total) DESC) AS rnk\n"
                "FROM orders\n"
                "WHERE ordered_at >= now() - interval '1 year'\n"
                "GROUP BY 1, 2;\n"),
               "CREATE INDEX CONCURRENTLY idx_orders_customer_date\n    ON orders (customer_id, ordered_at DESC);\n"),
         lang="sql"),
    dict(titles=("Espresso Dialing In", "Sour Espresso Shots", "Choosing a Coffee Grinder"),
         things=("the grind size", "the dose", "the brew ratio", "the shot time", "fresh beans", "the tamp",
                 "water temperature", "the grinder burrs"),
         actions=("grind a bit finer", "weigh the dose and the output", "aim for a 1:2 ratio",
                  "use beans roasted within the last month", "change only one variable at a time", "purge the grinder"),
         goals=("pull a balanced shot", "make a café-quality flat white at home", "pick a grinder under $300",
                "get consistent shots every morning"),
         problems=("the shots taste sour", "the shot runs in 15 seconds", "the milk foam is too bubbly",
                   "every shot tastes different"),
         fixes=("grind finer until the shot takes about 28 seconds", "raise the brew temperature slightly",
                "stretch the milk for less time and swirl it afterwards", "dose the same weight every time")),
    dict(titles=("React State Management", "useEffect Infinite Loop", "React Form Validation"),
         things=("the component state", "useEffect", "the dependency array", "context", "the reducer",
                 "props", "memoization", "the form library"),
         actions=("lift the state up to the parent", "move the fetch into a custom hook", "add the missing dependency",
                  "split the big component into smaller ones", "use a reducer for related state",
                  "memoize the expensive calculation"),
         goals=("share state between sibling components", "stop unnecessary re-renders", "validate a multi-step form",
                "structure a mid-sized app cleanly"),
         problems=("the effect runs in an infinite loop", "the component re-renders on every keystroke",
                   "the state is stale inside the callback", "the context causes the whole tree to re-render"),
         fixes=("derive the value during render instead of storing it in state", "use the functional form of setState",
                "split the context into smaller providers", "wrap the callback in useCallback"),
         code=(("function useUser(id) {\n"
                "  const [user, setUser] = useState(null);\n"
                "  useEffect(() => {\n"
                "    let cancelled = false;\n"
                "    fetch(`/api/users/${id}`)\n"
                "      .then((r) => r.json())\n"
                "      .then((data) => { if (!cancelled) setUser(data); });\n"
                "    return () => { cancelled = true; };\n"
                "  }, [id]);\n"
                "  return user;\n"
                "}\n"),),
         lang="jsx"),
    dict(titles=("Fantasy Novel Worldbuilding", "Chapter One Feedback", "Magic System Ideas"),
         things=("the magic system", "the opening chapter", "the villain's motivation", "the pacing", "the point of view",
                 "the map", "the dialogue", "the subplot"),
         actions=("start the story closer to the inciting incident", "give the magic a clear cost",
                  "cut exposition from the first chapter", "write the villain's backstory even if it never appears",
                  "read the dialogue out loud", "outline the three main acts"),
         goals=("finish the first draft this year", "make the world feel lived-in", "write a stronger opening",
                "keep the middle of the book from sagging"),
         problems=("the first chapter is mostly description", "my villain feels flat", "the middle of the book drags",
                   "every character sounds the same"),
         fixes=("open with a character making a choice", "give each character a verbal habit",
                "add a midpoint twist that changes the goal", "show the world through what characters need from it")),
    dict(titles=("Guitar Practice Routine", "Barre Chords Help", "Learning Fingerstyle"),
         things=("barre chords", "the metronome", "finger strength", "chord changes", "the strumming pattern",
                 "scales", "ear training", "the capo"),
         actions=("practice chord changes for one minute at a time", "start slow with a metronome",
                  "learn one song you love", "press just behind the fret", "warm up with a simple scale",
                  "record yourself once a week"),
         goals=("play a full song for my friends", "finally get clean barre chords", "learn fingerstyle basics",
                "practice efficiently with 20 minutes a day"),
         problems=("my barre chords buzz", "my fingertips hurt after ten minutes", "I can't switch chords in time",
                   "I get bored with exercises"),
         fixes=("roll the index finger slightly onto its side", "lower the action on the guitar",
                "practice the switch slowly, then speed up", "split practice into technique and fun songs")),
    dict(titles=("Raised Bed Vegetable Garden", "Tomato Plants Problems", "Composting Basics"),
         things=("the raised bed", "the soil mix", "companion planting", "the compost", "watering", "mulch",
                 "the tomato plants", "crop rotation"),
         actions=("fill the bed with a mix of compost and topsoil", "water deeply twice a week", "add a layer of mulch",
                  "plant basil next to the tomatoes", "rotate crops every season", "prune the tomato suckers"),
         goals=("grow enough salad greens for the summer", "start a small compost pile", "plan a beginner vegetable garden",
                "get more tomatoes this year"),
         problems=("the tomato leaves have brown spots", "the lettuce bolts too early", "the compost smells bad",
                   "slugs eat the seedlings"),
         fixes=("water at the base instead of over the leaves", "plant lettuce in partial shade",
                "add more dry brown material to the compost", "use a beer trap or copper tape")),
    dict(titles=("Pandas GroupBy Help", "Cleaning a Messy CSV", "Plotting Sales Data"),
         things=("the DataFrame", "groupby", "missing values", "the date column", "the merge", "pivot tables",
                 "the plot", "data types"),
         actions=("parse the dates when reading the CSV", "drop duplicates before merging", "fill missing values explicitly",
                  "convert the column to a category", "use groupby with agg", "plot a rolling average"),
         goals=("summarize sales by region and month", "clean a messy CSV export", "find outliers in the data",
                "make a clear chart for a presentation"),
         problems=("the merge produces way too many rows", "the dates are read as strings", "the numbers have commas in them",
                   "the plot is unreadable"),
         fixes=("check that the join keys are unique on one side", "pass thousands=',' to read_csv",
                "resample to weekly totals before plotting", "set dtypes up front")),
    dict(titles=("Better Sleep Routine", "Waking Up at Night", "Jet Lag Tips"),
         things=("the wind-down routine", "caffeine", "morning light", "the bedroom temperature", "screen time",
                 "a consistent wake time", "naps", "the sleep schedule"),
         actions=("keep the same wake time every day", "get outside for morning light", "stop caffeine after noon",
                  "keep the bedroom cool and dark", "put the phone in another room", "write tomorrow's to-do list before bed"),
         goals=("fall asleep faster", "stop waking up at 3 am", "adjust to a new time zone", "feel less tired in the afternoon"),
         problems=("I lie awake for an hour", "I wake up at 3 am and can't fall back asleep",
                   "I feel groggy even after eight hours", "weekends throw my schedule off"),
         fixes=("get up and read in dim light if you're awake longer than 20 minutes", "keep naps under 20 minutes",
                "shift your schedule by 30 minutes a day", "limit alcohol in the evening")),
    dict(titles=("Rust Borrow Checker Error", "Rust Lifetimes Explained", "Rust CLI Tool Structure"),
         things=("the borrow checker", "lifetimes", "ownership", "the Result type", "traits", "the iterator",
                 "clone", "Arc and Mutex"),
         actions=("return an owned String instead of a reference", "clone the small value and move on",
                  "use the ? operator for errors", "split the struct so the borrows don't overlap",
                  "wrap shared state in Arc<Mutex<T>>", "iterate by reference"),
         goals=("understand lifetimes properly", "structure a small CLI tool", "share state across threads",
                "get rid of all the unwraps"),
         problems=("I get 'cannot borrow as mutable more than once'", "the compiler asks for lifetime annotations everywhere",
                   "the program panics on bad input", "cloning feels like cheating"),
         fixes=("limit the scope of the first borrow", "store indices instead of references",
                "define your own error enum and implement From", "accept &str and return String"),
         code=(("fn parse_line(line: &str) -> Result<(String, u32), ParseError> {\n"
                "    let (name, count) = line.split_once(',').ok_or(ParseError::MissingComma)?;\n"
                "    Ok((name.trim().to_string(), count.trim().parse()?))\n"
                "}\n"),),
         lang="rust"),
    dict(titles=("Best Man Speech Ideas", "Wedding Toast Draft", "Retirement Speech for My Dad"),
         things=("the opening line", "the story", "the toast", "the length", "inside jokes", "the ending",
                 "the delivery", "the notes"),
         actions=("open with a short, warm story", "keep it under five minutes", "practice in front of a friend",
                  "mention the partner as much as your friend", "end with a clear toast", "print the speech in a large font"),
         goals=("write a funny but heartfelt speech", "not get too nervous on the day", "keep everyone engaged",
                "honor someone without making it awkward"),
         problems=("my draft is mostly inside jokes", "it runs over ten minutes", "I get very nervous speaking in public",
                   "the ending feels flat"),
         fixes=("pick one story that shows who they are", "cut anything only three people would understand",
                "finish by raising a glass to the couple", "slow down and pause after each joke")),
    dict(titles=("Solar Panels for Home", "Heat Pump vs Furnace", "Lowering the Electric Bill"),
         things=("the roof orientation", "the inverter", "net metering", "the payback period", "the heat pump",
                 "insulation", "the battery", "the utility rates"),
         actions=("get three quotes from local installers", "check the roof's remaining lifespan",
                  "compare the payback period with and without a battery", "seal the drafts first",
                  "look up local rebates", "track your usage for a month"),
         goals=("cut my electricity bill in half", "decide whether solar is worth it", "replace an old gas furnace",
                "make the house more comfortable in winter"),
         problems=("the quotes vary by thousands of dollars", "the roof faces east", "the bill spikes every winter",
                   "the heat pump struggles on very cold days"),
         fixes=("ask each installer for the estimated annual production", "improve the attic insulation before upgrading",
                "size the system from last year's usage", "keep a backup heat source for the coldest week")),
    dict(titles=("Puppy Training Schedule", "Dog Pulls on the Leash", "Crate Training Help"),
         things=("the crate", "positive reinforcement", "the leash", "treats", "socialization", "the recall",
                 "potty breaks", "short sessions"),
         actions=("reward the behavior within two seconds", "keep sessions to five minutes", "stop walking when the leash gets tight",
                  "feed meals in the crate", "practice recall in the house first", "take the puppy out after every nap"),
         goals=("house-train my puppy", "stop leash pulling", "teach a reliable recall", "get the dog comfortable alone"),
         problems=("the puppy cries in the crate all night", "he pulls on the leash constantly",
                   "she ignores me at the park", "he jumps on every guest"),
         fixes=("move the crate next to your bed for the first week", "use higher-value treats outside",
                "ask guests to ignore him until all four paws are on the floor", "practice with a long line first")),
    dict(titles=("Linear Algebra Eigenvalues", "Calculus Homework Help", "Statistics Exam Review"),
         things=("eigenvalues", "the determinant", "the chain rule", "the null hypothesis", "matrix multiplication",
                 "the derivative", "standard deviation", "the p-value"),
         actions=("write out the characteristic polynomial", "check your answer by plugging it back in",
                  "draw a picture of the transformation", "work through one example by hand", "list what is given and what is asked",
                  "practice with past exam questions"),
         goals=("understand eigenvectors intuitively", "prepare for the final exam", "solve related-rates problems",
                "interpret a p-value correctly"),
         problems=("I keep getting the sign wrong", "I understand the lecture but can't do the problems",
                   "the textbook explanation makes no sense to me", "I run out of time on exams"),
         fixes=("do the easy questions first and come back to the hard ones", "explain each step in words before computing",
                "redo the worked examples without looking", "check the dimensions of every matrix")),
    dict(titles=("Git Rebase vs Merge", "Undo a Git Commit", "Team Git Workflow"),
         things=("the feature branch", "rebase", "the merge commit", "the reflog", "the pull request", "main",
                 "a squash merge", "the commit history"),
         actions=("rebase the feature branch onto main", "use git reflog to find the lost commit",
                  "squash small fixup commits", "protect the main branch", "write descriptive commit messages",
                  "keep pull requests small"),
         goals=("keep a clean history", "recover a commit I deleted", "set up a simple workflow for a team of four",
                "resolve conflicts less painfully"),
         problems=("I committed to the wrong branch", "the rebase has conflicts in every commit",
                   "someone force-pushed over my changes", "the history is full of merge commits"),
         fixes=("cherry-pick the commit onto the right branch and reset the other one", "rebase more often so conflicts stay small",
                "never force-push to shared branches", "use --force-with-lease instead of --force"),
         code=(("git switch feature/login\n"
                "git fetch origin\n"
                "git rebase origin/main\n"
                "# fix conflicts, then\n"
                "git add -A && git rebase --continue\n"
                "git push --force-with-lease\n"),),
         lang="bash"),
    dict(titles=("Weekly Meal Prep Ideas", "High Protein Vegetarian Meals", "Cooking for One"),
         things=("the grocery list", "batch cooking", "protein", "the freezer", "sauces", "grain bowls",
                 "the spice rack", "leftovers"),
         actions=("cook two grains and two proteins on Sunday", "make one versatile sauce", "freeze meals in single portions",
                  "plan meals around what's on sale", "roast a big tray of vegetables", "keep a few pantry staples"),
         goals=("eat healthier on a budget", "get 120 g of protein a day without meat", "spend less than an hour cooking on weekdays",
                "stop wasting food"),
         problems=("I get bored of eating the same thing", "the vegetables go soggy by Wednesday", "I end up ordering takeout",
                   "I throw away half the groceries"),
         fixes=("use the same base with different sauces", "store dressing separately", "keep a backup freezer meal for busy nights",
                "shop with a list based on the plan")),
)

_QUESTIONS = (
    "I'm trying to {g}, but {p}. Any idea why?",
    "What's the best way to {a}?",
    "Can you explain how {t} and {t2} relate to each other?",
    "Should I {a} before or after I {a2}?",
    "What would you recommend if {p}?",
    "Can you give me a step-by-step plan to {g}?",
    "Is it a bad idea to skip {t} entirely?",
    "Thanks, that helps. How does {t} fit into this?",
    "Could you make that shorter and focus on {t}?",
    "I tried that and {p}. What should I try next?",
    "How would you {g} if you were starting from scratch?",
    "Why does {t} matter so much?",
    "Is it normal that {p}?",
    "What are the most common mistakes with {t}?",
    "Can you compare {t} and {t2} for someone who wants to {g}?",
    "Ok, and how often should I {a}?",
    "Makes sense. What about {t}?",
    "Could you turn that into a short checklist?",
)
_CONTEXT = ("I'm trying to {g}.", "Right now {p}.", "The problem is that {p}.", "My goal is to {g}.",
            "I want to {g}, and {t} is where I'm stuck.", "For context, I already {a}.")
_OPENERS = (
    "", "", "", "Hi! ", "Hey, quick question. ", "I'm a complete beginner. ", "I've been at this for about a year. ",
    "I only have a few hours a week. ", "Hello 👋 ", "So here's my situation. ", "Okay, I need some help. ",
)
_SENTENCES = (
    "The most important factor here is {t}, because it directly affects {t2}.",
    "A simple way to {g} is to {a} first and only then {a2}.",
    "If {p}, the usual cause is {t}.",
    "Don't worry too much about {t} at the beginning — {t2} matters more.",
    "A lot of people forget to {a2}, which is often why {p}.",
    "Keep notes on {t} so you can see what changes when you adjust {t2}.",
    "As a rule of thumb, {f}.",
    "Once that feels comfortable, {a2} and watch how {t} changes.",
    "It also helps to {a}, especially if {p}.",
    "There's no single right answer, but {t} is usually the best place to start.",
    "Think of {t} as the foundation and {t2} as the fine-tuning.",
    "You'll know it's working when {t} becomes more predictable.",
    "In most cases you can fix this if you {f}.",
    "I'd suggest you {a} for a couple of weeks before changing anything else.",
    "The good news is that {t} is easy to adjust once you know what to look for.",
    "Try to {f}; that alone solves the problem for a lot of people.",
    "If your goal is to {g}, consistency with {t} beats any clever trick.",
    "One thing people often overlook is {t}.",
    "It's worth writing down what you expect to happen before you {a}.",
    "That said, everyone's situation is a little different, so treat this as a starting point.",
    "When {p}, resist the urge to change everything at once.",
    "Small, regular adjustments to {t} add up faster than you'd think.",
    "You don't need special equipment for this; {t} and a bit of patience go a long way.",
    "After that, {a} and compare the results with what you had before.",
    "A quick sanity check: does {t} look the way you expected?",
)
_INTROS = (
    "Great question!", "Sure — here's how I'd approach it.", "Short answer: yes, but there's a caveat.",
    "Here's a practical breakdown:", "That's a really common problem, and it's usually fixable.", "Got it. Let's go step by step.",
    "Happy to help! 😊", "Good news: this is easier than it looks.", "Absolutely. Here's what I'd do.",
    "Let me break this down.", "Okay! Here's a plan that should work for you.", "You're on the right track.",
)
_OUTROS = (
    "Let me know how it goes!", "Want me to turn this into a weekly plan?", "If you share more details about {t}, I can be more specific.",
    "Good luck — you've got this! 🚀", "Does that help?", "Happy to go deeper on any of these points.",
    "Tell me what you try first and we can adjust from there.", "I hope this helps! 🙂",
)
_HEADINGS = ("### Key steps", "### ✅ Quick checklist", "**What to try next:**", "### Summary", "**In short:**", "### 👉 Plan")
_TITLES_MISC = ("New chat", "Quick question", "Help with a problem")

# Whole conversations in another language: titles, questions, answer sentences.
_FOREIGN = (
    dict(titles=("Viaje a Oaxaca", "Receta de paella", "Plan de estudio"),
         questions=("¿Qué me recomiendas ver en Oaxaca si tengo solo tres días?", "¿Cuál es la mejor época del año para viajar allí?",
                    "¿Puedes darme una receta sencilla de paella para cuatro personas?", "¿Cómo puedo organizar mejor mi tiempo de estudio?",
                    "Gracias. ¿Y qué debería evitar?", "¿Me lo puedes resumir en una lista corta?"),
         sentences=("Te recomiendo empezar por el centro histórico, que se recorre fácilmente a pie.",
                    "La mejor época suele ser entre octubre y marzo, cuando hace menos calor.",
                    "No olvides probar el mole negro y las tlayudas en el mercado.",
                    "Para la paella, lo más importante es no remover el arroz una vez que empieza a hervir.",
                    "Usa un caldo casero si puedes; marca una gran diferencia en el sabor.",
                    "Divide tu tiempo de estudio en bloques de 25 minutos con pausas cortas.",
                    "Es útil repasar lo aprendido al final de cada día, aunque sea solo diez minutos.",
                    "Evita planear demasiadas actividades en un solo día; el viaje se disfruta más con calma.",
                    "Si tienes dudas, pregunta en la oficina de turismo: suelen ser muy amables.",
                    "Una buena señal es que el arroz forme una capa ligeramente tostada en el fondo, el famoso socarrat.",
                    "Lo ideal es combinar teoría y práctica desde el principio.", "¡Espero que lo disfrutes mucho! 😊")),
    dict(titles=("京都旅行の計画", "日本語の勉強方法", "Pythonのエラーについて"),
         questions=("京都で三日間過ごすなら、どこを回るのがおすすめですか？", "紅葉の時期はいつ頃が一番きれいですか？",
                    "日本語の漢字を効率よく覚える方法を教えてください。", "Pythonで「ModuleNotFoundError」が出ます。どうすればいいですか？",
                    "ありがとうございます。もう少し詳しく説明してもらえますか？", "要点を箇条書きでまとめてください。"),
         sentences=("まずは清水寺と祇園のあたりを午前中に回るのがおすすめです。", "紅葉は例年十一月中旬から下旬にかけてが見頃です。",
                    "漢字は単語の中で覚えると、意味と読み方が同時に身につきます。", "毎日少しずつ復習することが、一番の近道です。",
                    "このエラーは、仮想環境にパッケージがインストールされていない場合によく起こります。",
                    "「pip install」を実行する前に、どのPythonを使っているか確認してください。",
                    "混雑を避けたい場合は、朝早く出発するのがいいでしょう。",
                    "嵐山の竹林は、夕方よりも早朝のほうが静かで写真も撮りやすいです。",
                    "分からないことがあれば、いつでも聞いてくださいね。", "アプリを使った間隔反復学習も効果的です。",
                    "移動には市バスの一日乗車券が便利です。", "楽しい旅になりますように！🍁")),
    dict(titles=("学习机器学习的路线", "周末做饭计划", "面试准备"),
         questions=("我想自学机器学习，应该从哪里开始？", "需要先把数学学好吗？", "能帮我准备一下产品经理的面试问题吗？",
                    "周末想做几道简单的家常菜，有什么推荐？", "谢谢！能再具体一点吗？", "请用三点总结一下。"),
         sentences=("建议先打好Python和基础统计的底子，再学习常见的模型。", "线性代数和概率论很重要，但不必一开始就全部掌握。",
                    "可以边做项目边补数学知识，这样更容易坚持。", "面试时要用具体的例子说明你是如何解决问题的。",
                    "准备几个关于用户需求分析的故事会很有帮助。", "番茄炒蛋和青椒土豆丝都很适合新手。",
                    "做菜前先把所有材料切好，会轻松很多。", "每周固定时间复习，比临时突击效果好得多。",
                    "如果遇到问题，可以先查看官方文档。", "不要害怕犯错，这是学习过程的一部分。", "祝你顺利！💪",
                    "可以先从一个小目标开始，比如完成一个分类项目。")),
    dict(titles=("Wohnungssuche in Berlin", "Fragen zur Steuererklärung", "Fahrradreparatur"),
         questions=("Worauf sollte ich bei der Wohnungssuche in Berlin achten?", "Welche Unterlagen brauche ich für die Bewerbung um eine Wohnung?",
                    "Kann ich Arbeitszimmerkosten in der Steuererklärung absetzen?", "Meine Fahrradkette springt ständig ab. Was kann ich tun?",
                    "Danke! Kannst du das etwas genauer erklären?", "Gib mir bitte eine kurze Checkliste."),
         sentences=("Am wichtigsten ist, schnell zu reagieren, denn gute Wohnungen sind oft nach wenigen Stunden weg.",
                    "Eine Schufa-Auskunft und die letzten drei Gehaltsnachweise solltest du immer bereithalten.",
                    "Die Homeoffice-Pauschale kann eine einfache Alternative zum Arbeitszimmer sein.",
                    "Prüfe zuerst, ob die Kette zu lang oder abgenutzt ist.", "Oft hilft es schon, die Schaltung neu einzustellen.",
                    "Ein kurzes, freundliches Anschreiben erhöht deine Chancen spürbar.",
                    "Bewahre alle Belege übersichtlich auf, das spart später viel Zeit.",
                    "Wenn du unsicher bist, lohnt sich ein Gespräch mit einem Lohnsteuerhilfeverein.",
                    "Für die Besichtigung solltest du pünktlich und gut vorbereitet sein.",
                    "Eine gut geölte Kette läuft leiser und hält länger.", "Viel Erfolg dabei! 🍀",
                    "Schreib mir gern, wenn du noch Fragen hast.")),
    dict(titles=("Recette de ratatouille", "Apprendre la guitare", "Préparer un entretien"),
         questions=("Comment réussir une ratatouille qui ne soit pas trop aqueuse ?",
                    "Combien de temps faut-il pour apprendre les accords de base à la guitare ?",
                    "Quelles questions poser à la fin d'un entretien d'embauche ?", "Merci ! Tu peux m'en dire un peu plus ?",
                    "Peux-tu résumer ça en quelques points ?", "Et si je n'ai que vingt minutes par jour ?"),
         sentences=("Le secret, c'est de faire revenir chaque légume séparément avant de tout mélanger.",
                    "Laisse mijoter à feu doux sans couvercle pour que l'eau s'évapore.",
                    "Avec une pratique régulière, la plupart des débutants maîtrisent les accords de base en quelques semaines.",
                    "Vingt minutes par jour valent mieux qu'une longue séance le week-end.",
                    "Demande quels sont les défis de l'équipe pour les six prochains mois.",
                    "Montre que tu t'es renseigné sur l'entreprise avant l'entretien.",
                    "N'hésite pas à ajouter un peu de thym et de laurier en fin de cuisson.",
                    "Commence par les accords de sol, do et ré : ils couvrent énormément de chansons.",
                    "Prends des notes pendant l'entretien, cela montre ton intérêt.", "Bonne chance, tu vas y arriver ! 🎸",
                    "C'est tout à fait normal d'avoir mal au bout des doigts au début.",
                    "Goûte et rectifie l'assaisonnement juste avant de servir.")),
    dict(titles=("План тренировок", "Изучение английского", "Ремонт на кухне"),
         questions=("Составь, пожалуйста, план тренировок на три дня в неделю.", "Как быстрее выучить английские слова?",
                    "С чего начать ремонт на кухне?", "Спасибо! А можно подробнее?", "Сделай короткий список самого важного.",
                    "А если у меня мало времени по вечерам?"),
         sentences=("Начни с базовых упражнений: приседаний, отжиманий и тяги.",
                    "Важно давать мышцам хотя бы один день отдыха между тренировками.",
                    "Учи слова в контексте, а не отдельными списками.", "Приложения с интервальным повторением очень помогают.",
                    "Сначала составь план и бюджет, а потом выбирай материалы.",
                    "Электрику и сантехнику лучше менять до отделочных работ.",
                    "Даже пятнадцать минут в день дают заметный результат через месяц.",
                    "Следи за техникой, а не за весом — это убережёт от травм.",
                    "Смотри сериалы с субтитрами на английском языке.",
                    "Не забудь про вентиляцию и хорошее освещение рабочей зоны.", "Удачи! Если будут вопросы — пиши. 👍",
                    "Постепенно увеличивай нагрузку, примерно на пять процентов в неделю.")),
)

_PY_CODE = (
    ("import pandas as pd\n"
     "\n"
     "df = pd.read_csv('/mnt/data/sales.csv', parse_dates=['date'])\n"
     "df.groupby(df['date'].dt.to_period('M'))['revenue'].sum().tail(12)"),
    ("import matplotlib.pyplot as plt\n"
     "\n"
     "fig, ax = plt.subplots(figsize=(8, 4))\n"
     "ax.plot(df['date'], df['revenue'].rolling(7).mean())\n"
     "ax.set_title('7-day average revenue')\n"
     "plt.show()"),
    "import numpy as np\n\nA = np.array([[2, 1], [1, 3]])\nvals, vecs = np.linalg.eig(A)\nvals, vecs",
    "monthly = 2450 * 0.2\nmonths = 6000 / monthly\nround(months, 1)",
    "df = pd.read_excel('/mnt/data/budget.xlsx')\ndf.info()\ndf.head()",
    "from datetime import date\n(date(2026, 10, 12) - date.today()).days // 7",
)
_PY_OUTPUT = (
    ("date\n"
     "2025-06    18234.50\n"
     "2025-07    19877.10\n"
     "2025-08    17650.25\n"
     "2025-09    21003.90\n"
     "Freq: M, Name: revenue, dtype: float64"),
    "<<ImageDisplayed>>",
    "(array([1.38196601, 3.61803399]),\n array([[-0.85065081, -0.52573111],\n        [ 0.52573111, -0.85065081]]))",
    "12.2",
    ("<class 'pandas.core.frame.DataFrame'>\n"
     "RangeIndex: 48 entries, 0 to 47\n"
     "Data columns (total 4 columns):\n"
     " #   Column    Non-Null Count  Dtype\n"
     "---  ------    --------------  -----\n"
     " 0   category  48 non-null     object\n"
     " 1   amount    46 non-null     float64"),
    "31",
)
_SITES = (
    ("Wikipedia", "en.wikipedia.org"), ("Reddit", "www.reddit.com"), ("The Guardian", "www.theguardian.com"),
    ("Stack Overflow", "stackoverflow.com"), ("Mayo Clinic", "www.mayoclinic.org"), ("NerdWallet", "www.nerdwallet.com"),
    ("Serious Eats", "www.seriouseats.com"), ("Lonely Planet", "www.lonelyplanet.com"), ("MDN Web Docs", "developer.mozilla.org"),
)
_ABOUT_USER = (
    "I'm a software developer in Berlin. I like concise answers and practical examples.",
    "Teacher, 34, based in Lyon. Learning Python in my spare time. Vegetarian.",
    "I run a small bakery and I'm not very technical. Please explain things simply.",
    "PhD student in biology. I mostly use R and a bit of Python. 🧬",
)
_PROFILE_PREAMBLE = (
    "The user provided the following information about themselves. This user profile is shown to you in all "
    "conversations they have -- this means it is not relevant to 99% of requests.\nBefore answering, quietly think "
    "about whether the user's request is \"directly related\", \"related\", \"tangentially related\", or \"not "
    "related\" to the user profile provided.\nUser profile:\n"
)
_INSTRUCTIONS_PREAMBLE = "The user provided the additional info about how they would like you to respond:\n"
_ABOUT_MODEL = (
    "Be direct. Skip the disclaimers. Use bullet points when it helps.",
    "Answer in British English. Keep responses short unless I ask for detail.",
    "Ask a clarifying question if my request is ambiguous. Cite sources when you can.",
    "Use a friendly tone, and always include an example.",
)


# ---------------------------------------------------------------------------
# Text pool: rendered once per export so generating text is mostly list picks and joins.


class _TextPool:
    """Pre-rendered questions, paragraphs and lists for every topic and language."""

    def __init__(self, rng: random.Random, *, demo: bool):
        self.demo = demo
        self.topics = [self._render_topic(rng, topic) for topic in _TOPICS]
        self.foreign = [self._render_foreign(rng, lang) for lang in _FOREIGN]
        self.filler = [p for t in self.topics for p in t["paragraphs"][:8]]

    def _render_topic(self, rng, topic) -> dict:
        def fill(template: str, assistant: bool = False) -> str:
            t, t2 = rng.sample(topic["things"], 2)
            a, a2 = rng.sample(topic["actions"], 2)
            p = rng.choice(topic["problems"])
            s = template.format(t=t, t2=t2, a=a, a2=a2, g=rng.choice(topic["goals"]),
                                p=_second_person(p) if assistant else p, f=rng.choice(topic["fixes"]))
            return s[0].upper() + s[1:]

        per_paragraph = (2, 3) if self.demo else (2, 5)
        sentences = [fill(rng.choice(_SENTENCES), True) for _ in range(140)]
        # Distinct templates within a paragraph, so no paragraph repeats a sentence shape.
        paragraphs = [" ".join(fill(x, True) for x in rng.sample(_SENTENCES, rng.randint(*per_paragraph)))
                      for _ in range(60)]
        lists = []
        for _ in range(12):
            steps = rng.sample(topic["actions"] + topic["fixes"], 3 if self.demo else rng.randint(3, 6))
            items = "\n".join(f"{i}. {s[0].upper()}{s[1:]}." for i, s in enumerate(steps, 1))
            lists.append(f"{rng.choice(_HEADINGS)}\n{items}")
        codes = [f"Here's an example:\n\n```{topic.get('lang', '')}\n{c}```" for c in topic.get("code", ())]
        return dict(
            titles=topic["titles"],
            first=[rng.choice(_OPENERS) + fill(rng.choice(_QUESTIONS[:7] + _QUESTIONS[10:15])) for _ in range(30)],
            questions=[fill(rng.choice(_QUESTIONS)) + rng.choice(("", "", "", "", " 🙏", " Thanks!", " 🤔"))
                       for _ in range(60)],
            context=[fill(rng.choice(_CONTEXT)) for _ in range(30)],
            sentences=sentences, paragraphs=paragraphs, lists=lists, codes=codes,
            outros=[fill(o) for o in _OUTROS for _ in range(2)],
            goals=topic["goals"], things=topic["things"], code=topic.get("code", ()), foreign=False,
        )

    def _render_foreign(self, rng, lang) -> dict:
        s = lang["sentences"]
        paragraphs = [" ".join(rng.sample(s, rng.randint(2, 4))) for _ in range(30)]
        return dict(titles=lang["titles"], first=lang["questions"][:4], questions=lang["questions"],
                    context=lang["questions"],
                    sentences=list(s), paragraphs=paragraphs, lists=[], codes=[], outros=[s[-1]],
                    goals=lang["questions"], things=lang["titles"], code=(), foreign=True)

    def topic(self, rng: random.Random) -> dict:
        if rng.random() < 0.15:
            return rng.choice(self.foreign)
        return rng.choice(self.topics)

    def question(self, rng: random.Random, topic: dict, first: bool, verbosity: float) -> str:
        q = rng.choice(topic["first"] if first else topic["questions"])
        if not self.demo and rng.random() < 0.08 * verbosity:
            # Users paste material: code, notes, a draft.
            pasted = rng.choice(topic["code"]) if topic["code"] and rng.random() < 0.5 else \
                "\n\n".join(rng.choices(topic["paragraphs"], k=rng.randint(1, 4)))
            q = f"{q}\n\nHere's what I have so far:\n\n{pasted}"
        return q

    def reply(self, rng: random.Random, topic: dict, verbosity: float, cite=None) -> str:
        """An assistant answer: intro, paragraphs, maybe a list or code, maybe an outro."""
        if self.demo:
            n = rng.randint(1, 2)
        else:
            n = min(12, max(1, int(rng.expovariate(1 / (1.7 * verbosity)) + 0.8)))
        parts = [rng.choice(_INTROS)] if topic["lists"] and rng.random() < 0.7 else []
        pars = rng.choices(topic["paragraphs"], k=n)
        if cite is not None:
            pars = [p + cite(rng) for p in pars]
        parts.extend(pars)
        if topic["lists"] and rng.random() < (0.2 if self.demo else 0.45):
            parts.append(rng.choice(topic["lists"]))
        if topic["codes"] and rng.random() < (0.15 if self.demo else 0.4):
            parts.append(rng.choice(topic["codes"]))
        if rng.random() < 0.5:
            parts.append(rng.choice(topic["outros"]))
        return "\n\n".join(parts)

    def long_text(self, rng: random.Random, topic: dict, min_chars: int = 26_000) -> str:
        """Over 25k characters: a pasted document or a very long answer."""
        parts, n = [], 0
        while n < min_chars:
            p = rng.choice(topic["paragraphs"] if rng.random() < 0.7 else self.filler)
            parts.append(p)
            n += len(p) + 2
        return "\n\n".join(parts)

    def short(self, rng: random.Random, topic: dict) -> str:
        """One sentence in the assistant's voice."""
        return rng.choice(topic["sentences"])

    def context(self, rng: random.Random, topic: dict) -> str:
        """One sentence in the user's voice, saying what they are after."""
        return rng.choice(topic["context"])


_PRONOUNS = {"I": "you", "I'm": "you're", "I've": "you've", "my": "your", "My": "Your", "me": "you"}
_PRONOUN_RE = re.compile(r"\b(?:I'm|I've|I|my|My|me)\b")


def _second_person(clause: str) -> str:
    """'my loaf is dense' -> 'your loaf is dense': the user's problem retold by the assistant."""
    return _PRONOUN_RE.sub(lambda m: _PRONOUNS[m.group(0)], clause)


def _web_cite(rng: random.Random) -> str:
    return f" \ue200cite\ue202turn0search{rng.randint(0, 9)}\ue201"


def _browser_cite(rng: random.Random) -> str:
    return f" 【{rng.randint(0, 5)}†source】"


# ---------------------------------------------------------------------------
# ChatGPT conversations: a mapping tree of nodes.


_MODELS = (("text-davinci-002-render-sha", "gpt-4"), ("gpt-4o", "gpt-4", "gpt-4o-mini", "o1-preview"),
           ("gpt-4o", "o3", "gpt-5", "gpt-5-thinking", "gpt-4-1"))  # by era
# Rare features are also forced at fixed conversation slots, so any export of a few MB shows each one.
_RARE_EVERY = 64
_FORCED_LANGUAGES = {3: 1, 11: 5, 43: 2}  # slot -> index in _FOREIGN: Japanese, Russian, Chinese
_DEMO_TURNS = ("image", "python", "search", "thinking", "foreign", "canmore", "search", "bio", "image", "plain")


class _ChatGPTBuilder:
    """Builds one ChatGPT conversation dict at a time, sized to a byte target."""

    def __init__(self, rng: random.Random, pool: _TextPool, *, sharded: bool, demo: bool):
        self.rng = rng
        self.pool = pool
        self.sharded = sharded
        self.demo = demo
        self.ratio = 1.0  # actual JSON bytes per estimated byte, learned as we go

    def learn(self, actual: int) -> None:
        """Compare the last conversation's estimated and real JSON size, so later ones land closer."""
        if self.est > 5_000:
            self.ratio = 0.8 * self.ratio + 0.2 * min(3.0, max(0.3, actual / self.est))

    # -- small helpers -------------------------------------------------------

    def _uuid(self) -> str:
        h = "%032x" % self.rng.getrandbits(128)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

    def _request_id(self) -> str:
        r = self.rng.getrandbits(66)
        return "%016x-%s" % (r >> 2, ("IAD", "SJC", "FRA", "AMS")[r & 3])

    def _tick(self, lo: float = 2.0, hi: float = 90.0) -> float:
        self.t += self.rng.uniform(lo, hi)
        return round(self.t, 6)

    def _add(self, parent: str | None, message: dict | None, node_id: str | None = None, est: int = 0) -> str:
        nid = node_id or message["id"]
        node = {"id": nid, "message": message, "parent": parent}
        if not self.sharded:
            node["children"] = []
            if parent is not None:
                self.mapping[parent]["children"].append(nid)
        self.mapping[nid] = node
        self.est += est + 650
        if message is not None:
            self.n_messages += 1
        return nid

    def _message(self, role: str, content: dict, *, t, metadata: dict, name=None, recipient="all",
                 channel=None, end_turn=None, weight=1.0, status="finished_successfully", mid=None) -> dict:
        author = self.authors.get((role, name))
        if author is None:
            author = self.authors[role, name] = {"role": role, "name": name, "metadata": {}}
        m = {"id": mid or self._uuid(), "author": author, "create_time": t, "update_time": None, "content": content}
        if self.era > 0:
            m["status"] = status
        m["end_turn"] = end_turn
        m["weight"] = weight
        m["metadata"] = metadata
        m["recipient"] = recipient
        if self.era > 0:
            m["channel"] = channel
        return m

    def _metadata_templates(self) -> None:
        """Per-conversation metadata skeletons; copying one is much cheaper than building it."""
        # Sub-objects are shared between messages: each conversation is serialized at once and never mutated.
        user = {"request_id": None, "message_source": None, "timestamp_": "absolute", "message_type": None}
        assistant = {"finish_details": {"type": "stop", "stop_tokens": [200002]}, "is_complete": True,
                     "citations": [], "content_references": [], "message_type": None, "model_slug": self.model,
                     "default_model_slug": self.model, "parent_id": None, "request_id": None, "timestamp_": "absolute"}
        if self.era > 0:
            assistant.update({"message_locale": "en-US", "image_results": [], "search_result_groups": [],
                              "safe_urls": []})
        if self.era == 2:
            user.update({"selected_github_repos": [], "serialization_metadata": {"custom_symbol_offsets": []},
                         "dictation": False})
            assistant["model_switcher_deny"] = []
        self.user_md, self.assistant_md = user, assistant

    def _user_meta(self) -> dict:
        md = self.user_md.copy()
        md["request_id"] = self.request_id
        return md

    def _assistant_meta(self, parent: str, *, citations: list | None = None) -> dict:
        md = self.assistant_md.copy()
        md["parent_id"] = parent
        md["request_id"] = self.request_id
        if citations:
            md["content_references"] = citations
        return md

    # -- message kinds -------------------------------------------------------

    def user(self, parent: str, text: str, *, image=False) -> str:
        self.request_id = self._request_id()
        if image:
            w, h = self.rng.choice(((1024, 768), (1536, 2048), (828, 1792), (1920, 1080)))
            pointer = {"content_type": "image_asset_pointer", "asset_pointer": "file-service://file-" + "".join(
                self.rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789", k=22)),
                "size_bytes": self.rng.randint(80_000, 2_400_000), "width": w, "height": h, "fovea": None,
                "metadata": {"dalle": None, "gizmo": None, "sanitized": True} if self.era == 2 else None}
            content = {"content_type": "multimodal_text", "parts": [pointer, text]}
        else:
            content = {"content_type": "text", "parts": [text]}
        mid = None
        if self.era == 1:
            h = "%028x" % self.rng.getrandbits(112)  # client-made user ids start with aaa2 in 2023-24 exports
            mid = f"aaa2{h[:4]}-{h[4:8]}-4{h[9:12]}-a{h[13:16]}-{h[16:]}"
        m = self._message("user", content, t=self._tick(5, 240), metadata=self._user_meta(), mid=mid)
        return self._add(parent, m, est=len(text) + (350 if image else 0))

    def assistant(self, parent: str, text: str, *, citations=None, main=False) -> str:
        m = self._message("assistant", {"content_type": "text", "parts": [text]}, t=self._tick(),
                          metadata=self._assistant_meta(parent, citations=citations),
                          channel="final" if self.era == 2 else None, end_turn=True)
        if self.rng.random() < 0.3:
            m["update_time"] = round(m["create_time"] + self.rng.uniform(1, 30), 6)
        if main:
            self.main_answers.append(m["id"])
        return self._add(parent, m, est=len(text) + 250 + 400 * len(citations or ()))

    def tool_call(self, parent: str, recipient: str, content: dict, est: int) -> str:
        m = self._message("assistant", content, t=self._tick(1, 8), recipient=recipient,
                          metadata=self._assistant_meta(parent), end_turn=False,
                          channel="commentary" if self.era == 2 else None)
        return self._add(parent, m, est=est + 250)

    def tool_output(self, parent: str, name: str, content: dict, est: int, extra_meta: dict | None = None) -> str:
        md = {"is_complete": True, "model_slug": self.model, "parent_id": parent, "request_id": self.request_id,
              "timestamp_": "absolute"}
        if extra_meta:
            md.update(extra_meta)
        m = self._message("tool", content, t=self._tick(1, 20), name=name, metadata=md)
        return self._add(parent, m, est=est + 100)

    def hidden_system(self, parent: str | None, *, mid=None) -> str:
        m = self._message("system", {"content_type": "text", "parts": [""]}, t=None, weight=0.0,
                          metadata={"is_visually_hidden_from_conversation": True}, mid=mid)
        return self._add(parent, m)

    def custom_instructions(self, parent: str) -> str:
        about_user, about_model = self.rng.choice(_ABOUT_USER), self.rng.choice(_ABOUT_MODEL)
        data = {"about_user_message": about_user, "about_model_message": about_model}
        if self.era == 0 or self.rng.random() < 0.3:
            # The older form: a hidden system message carrying the instructions only in metadata.
            m = self._message("system", {"content_type": "text", "parts": [""]}, t=None, weight=1.0,
                              metadata={"is_visually_hidden_from_conversation": True, "is_user_system_message": True,
                                        "user_context_message_data": data})
        else:
            content = {"content_type": "user_editable_context",
                       "user_profile": _PROFILE_PREAMBLE + f"```{about_user}```",
                       "user_instructions": _INSTRUCTIONS_PREAMBLE + f"```{about_model}```"}
            m = self._message("user", content, t=None,
                              metadata={"is_visually_hidden_from_conversation": True, "user_context_message_data": data,
                                        "is_user_system_message": True})
        return self._add(parent, m, est=len(about_user) + len(about_model) + 500)

    # -- turns: each starts at tip (the end of the main branch) and returns the new tip --

    def turn_plain(self, tip: str, first: bool = False) -> str:
        rng, pool, topic = self.rng, self.pool, self.topic
        if rng.random() < self.p_branch:
            # An edit: an earlier version of this question, with its answer, left on a side branch.
            old = self.user(tip, pool.question(rng, topic, first, self.verbosity))
            self.assistant(old, pool.reply(rng, topic, self.verbosity))
        u = self.user(tip, self.long_text() if self._long() else pool.question(rng, topic, first, self.verbosity))
        if rng.random() < self.p_branch:
            # A regeneration: the answer the user asked to redo stays as a sibling.
            self.assistant(u, pool.reply(rng, topic, self.verbosity))
        text = self.long_text() if self._long() else pool.reply(rng, topic, self.verbosity)
        return self.assistant(u, text, main=True)

    def turn_image(self, tip: str) -> str:
        rng = self.rng
        q = rng.choice(("What's going on in this photo?", "Can you read the text in this screenshot?",
                        "Is this normal? See the picture.", "What do you think of this?", "これは何ですか？",
                        "Here's a photo of the problem 📷")) + " " + self.pool.context(rng, self.topic)
        u = self.user(tip, q, image=True)
        return self.assistant(u, "From the image, it looks like this is related to what we discussed. "
                              + self.pool.reply(rng, self.topic, self.verbosity), main=True)

    def turn_python(self, tip: str) -> str:
        rng = self.rng
        ask = rng.choice(("Can you analyze the attached file?", "Can you calculate that for me?",
                          "Plot this please.", "Run the numbers on this."))
        u = self.user(tip, ask + " " + self.pool.context(rng, self.topic))
        i = rng.randrange(len(_PY_CODE))
        code = _PY_CODE[i]
        c = self.tool_call(u, "python", {"content_type": "code", "language": "unknown",
                                         "response_format_name": None, "text": code}, len(code))
        t = self.t
        if rng.random() < 0.15:
            error = "Encountered exception: <class 'TimeoutError'>. Code execution state was reset."
            out = self.tool_output(c, "python", {"content_type": "system_error", "name": "tool_error", "text": error},
                                   len(error))
        else:
            result = {"status": "success", "run_id": self._uuid(), "start_time": t, "update_time": t + 1.2,
                      "code": code, "end_time": t + 1.2, "final_expression_output": _PY_OUTPUT[i],
                      "in_kernel_exception": None, "system_exception": None, "messages": [],
                      "jupyter_messages": [{"msg_type": "status", "parent_header": {"msg_id": self._uuid()},
                                            "content": {"execution_state": "idle"}}], "timeout_triggered": None}
            out = self.tool_output(c, "python", {"content_type": "execution_output", "text": _PY_OUTPUT[i]},
                                   len(_PY_OUTPUT[i]) * 2 + len(code) + 450, {"aggregate_result": result})
        return self.assistant(out, self.pool.reply(self.rng, self.topic, self.verbosity), main=True)

    def _search_query(self) -> str:
        return self.rng.choice(self.topic["goals"] if self.rng.random() < 0.5 else self.topic["things"])

    def turn_browser(self, tip: str) -> str:
        rng = self.rng
        u = self.user(tip, "Can you look up the latest advice on this? " + self.pool.context(rng, self.topic))
        query = self._search_query()
        c = self.tool_call(u, "browser", {"content_type": "code", "language": "unknown",
                                          "response_format_name": None, "text": f'search("{query}")'}, len(query) + 10)
        sites = rng.sample(_SITES, 3)
        result = "\n".join(f"# 【{i}†{query} - {name}†{domain}】\n{self.pool.short(rng, self.topic)}"
                           for i, (name, domain) in enumerate(sites))
        d = self.tool_output(c, "browser", {"content_type": "tether_browsing_display", "result": result,
                                            "summary": None, "assets": None, "tether_id": None},
                             len(result), {"_cite_metadata": {"citation_format": {"name": "tether_og"},
                                                              "metadata_list": [{"type": "webpage", "title": n,
                                                                                 "url": f"https://{d}/", "text": ""}
                                                                                for n, d in sites]}})
        c2 = self.tool_call(d, "browser", {"content_type": "code", "language": "unknown",
                                           "response_format_name": None, "text": "mclick([0, 2])"}, 14)
        name, domain = sites[0]
        quote = self.pool.reply(rng, self.topic, 1.0)
        url = f"https://{domain}/articles/{rng.randint(1000, 99999)}"
        q = self.tool_output(c2, "browser", {"content_type": "tether_quote", "url": url, "domain": domain,
                                             "text": quote, "title": f"{query} - {name}", "tether_id": None},
                             len(quote) + 100)
        return self.assistant(q, self.pool.reply(rng, self.topic, self.verbosity, cite=_browser_cite), main=True)

    def turn_webrun(self, tip: str) -> str:
        rng = self.rng
        u = self.user(tip, "Search the web for this please. " + self.pool.context(rng, self.topic))
        query = self._search_query()
        q = json.dumps({"search_query": [{"q": query, "recency": None}], "response_length": "short"})
        c = self.tool_call(u, "web.run", {"content_type": "code", "language": "unknown",
                                          "response_format_name": None, "text": q}, len(q))
        sites = rng.sample(_SITES, 4)
        result = "\n".join(f"【turn0search{i}†{name}†{domain}】 {self.pool.short(rng, self.topic)}"
                           for i, (name, domain) in enumerate(sites))
        d = self.tool_output(c, "web.run", {"content_type": "tether_browsing_display", "result": result,
                                            "summary": None, "assets": None, "tether_id": None}, len(result))
        refs = [{"matched_text": f"\ue200cite\ue202turn0search{i}\ue201", "start_idx": 0, "end_idx": 0,
                 "alt": f"([{name}](https://{domain}/))", "type": "grouped_webpages",
                 "items": [{"title": f"{query} | {name}", "url": f"https://{domain}/{rng.randint(1000, 99999)}",
                            "pub_date": None, "snippet": None, "attribution": name}]}
                for i, (name, domain) in enumerate(sites[:2])]
        return self.assistant(d, self.pool.reply(rng, self.topic, self.verbosity, cite=_web_cite),
                              citations=refs, main=True)

    def turn_thinking(self, tip: str) -> str:
        rng, topic = self.rng, self.topic
        u = self.user(tip, self.pool.question(rng, topic, False, self.verbosity))
        thoughts = [{"summary": f"Considering {rng.choice(topic['things'])}",
                     "content": " ".join(rng.sample(topic["sentences"], 3)), "chunks": [], "finished": True}
                    for _ in range(rng.randint(1, 3))]
        m = self._message("assistant", {"content_type": "thoughts", "thoughts": thoughts,
                                        "source_analysis_msg_id": self._uuid()}, t=self._tick(2, 10),
                          metadata=self._assistant_meta(u), end_turn=False, channel="commentary")
        th = self._add(u, m, est=sum(len(x["content"]) + 60 for x in thoughts) + 250)
        secs = rng.randint(3, 95)
        m = self._message("assistant", {"content_type": "reasoning_recap", "content": f"Thought for {secs}s"},
                          t=self._tick(1, 3), metadata=self._assistant_meta(th), end_turn=False, channel="commentary")
        rr = self._add(th, m, est=250)
        return self.assistant(rr, self.pool.reply(rng, topic, self.verbosity), main=True)

    def turn_canmore(self, tip: str) -> str:
        rng = self.rng
        u = self.user(tip, "Can you put that in a document so we can edit it together?")
        doc = self.pool.reply(rng, self.topic, self.verbosity)
        if rng.random() < 0.5:
            recipient = "canmore.create_textdoc"
            body = json.dumps({"name": self.title.lower().replace(" ", "_"), "type": "document", "content": doc},
                              ensure_ascii=False)
            reply = f"Successfully created text document '{self.title}' which will be referenced in all future " \
                    f"messages with the unique identifier textdoc_id: '{self._uuid().replace('-', '')[:24]}'"
        else:
            recipient = "canmore.update_textdoc"
            body = json.dumps({"updates": [{"pattern": ".*", "multiple": False, "replacement": doc}]},
                              ensure_ascii=False)
            reply = f"Successfully updated text document with textdoc_id '{self._uuid().replace('-', '')[:24]}'"
        c = self.tool_call(u, recipient, {"content_type": "code", "language": "json",
                                          "response_format_name": None, "text": body}, len(body))
        o = self.tool_output(c, recipient, {"content_type": "text", "parts": [reply]}, len(reply),
                             {"canvas": {"textdoc_id": "x", "textdoc_type": "document", "version": rng.randint(1, 9)}})
        return self.assistant(o, "I've put it in the document. " + self.pool.short(rng, self.topic), main=True)

    def turn_bio(self, tip: str) -> str:
        rng = self.rng
        goal = rng.choice(self.topic["goals"])
        u = self.user(tip, f"Remember that I want to {goal}." if rng.random() < 0.7
                      else self.pool.question(rng, self.topic, False, self.verbosity))
        memo = f"User wants to {goal}."
        c = self.tool_call(u, "bio", {"content_type": "text", "parts": [memo]}, len(memo))
        o = self.tool_output(c, "bio", {"content_type": "text", "parts": ["Model set context updated."]}, 30)
        return self.assistant(o, "Got it, I'll keep that in mind. " + self.pool.reply(rng, self.topic, self.verbosity),
                              main=True)

    def _long(self) -> bool:
        if self.force_long > 0 and self.rng.random() < 0.3:
            self.force_long -= 1
            return True
        return not self.demo and self.target > 60_000 and self.rng.random() < 0.002

    def long_text(self) -> str:
        return self.pool.long_text(self.rng, self.topic)

    # -- a whole conversation -----------------------------------------------

    def conversation(self, target: int, t0: float, index: int) -> tuple[dict, int, bool]:
        """Return (conversation dict, message count, has dialogue) of about target bytes of JSON."""
        rng = self.rng
        self.target = target
        self.era = 0 if t0 < _ERA1_START else (1 if t0 < _ERA2_START else 2)
        self.t = t0
        self.mapping, self.est, self.n_messages, self.main_answers = {}, 600, 0, []
        # The demo sample is small, so it walks through the features instead of leaving them to chance.
        demo_turn = _DEMO_TURNS[index % len(_DEMO_TURNS)] if self.demo else None
        if demo_turn == "foreign":
            self.topic = rng.choice(self.pool.foreign)
        elif index % _RARE_EVERY in _FORCED_LANGUAGES:
            self.topic = self.pool.foreign[_FORCED_LANGUAGES[index % _RARE_EVERY]]
        else:
            self.topic = self.pool.topic(rng)
        self.title = rng.choice(_TITLES_MISC) if rng.random() < 0.04 else rng.choice(self.topic["titles"])
        self.model = rng.choice(_MODELS[self.era])
        self.request_id = self._request_id()
        self.authors = {}
        self._metadata_templates()
        self.verbosity = 1.0 if self.demo else min(4.0, max(1.0, (target / 16_000) ** 0.3))
        self.p_branch = 0.12 if self.demo else 0.04
        self.force_long = 3 if target > 900_000 else 0
        want = target / self.ratio

        # The root: a literal id in newer exports, otherwise a uuid that may carry the hidden system message.
        if self.era > 0 and rng.random() < 0.75:
            root = self._add(None, None, "client-created-root")
            tip = self.hidden_system(root) if rng.random() < 0.9 else root
        elif rng.random() < 0.5:
            tip = root = self.hidden_system(None)
        else:
            root = self._add(None, None, self._uuid())
            tip = self.hidden_system(root)
        if rng.random() < 0.25:
            tip = self.custom_instructions(tip)

        dialogue = self.demo or not (index % (2 * _RARE_EVERY) == 37 or rng.random() < 0.004)
        if not dialogue:
            # Deliberately no user/assistant exchange: only hidden messages, maybe a memory update.
            if rng.random() < 0.6:
                memo = rng.choice(("User prefers metric units.", "User is vegetarian.", "User's name is Sam."))
                c = self.tool_call(tip, "bio", {"content_type": "text", "parts": [memo]}, len(memo))
                tip = self.tool_output(c, "bio", {"content_type": "text", "parts": ["Model set context updated."]}, 30)
            self.title = "New chat"
            main_leaf = tip
        else:
            tip = self.turn_plain(tip, first=True)
            kinds = self._turn_kinds()
            if demo_turn == "search":
                demo_turn = "webrun" if self.era == 2 else "browser"
            if demo_turn in kinds[0]:
                tip = getattr(self, "turn_" + demo_turn)(tip)
            while self.est < want:
                kind = rng.choices(kinds[0], kinds[1])[0]
                tip = getattr(self, "turn_" + kind)(tip)
            main_leaf = tip

        if self.era > 0 and dialogue and self._rare(index, 19, 0.01):
            # Exported while the answer was still streaming.
            leaf = self.mapping[main_leaf]["message"]
            leaf["status"], leaf["end_turn"] = "in_progress", None

        current = main_leaf
        answers = self.main_answers
        if dialogue and len(answers) >= 2 and self._rare(index, 23, 0.05):
            # The user went back up the tree: current_node is a non-leaf on the main branch.
            current = answers[rng.randrange(0, len(answers) - 1)]
        elif dialogue and self._rare(index, 29, 0.05):
            # A newer branch the user abandoned: current_node is an older leaf than the last one written.
            self.t += rng.uniform(600, 86_400)
            if len(answers) >= 2:
                anchor, first = answers[0], False
            else:
                # A later edit of the first question: a sibling of it.
                anchor, first = self.mapping[self.mapping[answers[0]]["parent"]]["parent"], True
            self.assistant(self.user(anchor, self.pool.question(rng, self.topic, first, 1.0)),
                           self.pool.reply(rng, self.topic, 1.0))
        elif self._rare(index, 7, 0.01):
            current = self._uuid()  # missing from mapping: readers must fall back to a leaf

        mapping = self.mapping
        if len(mapping) > 3 and self._rare(index, 31, 0.05):
            # The root is not always the first key.
            items = list(mapping.items())
            k = rng.randrange(1, len(items))
            mapping = dict(items[1:k + 1] + items[:1] + items[k + 1:])

        create_time = None if self._rare(index, 13, 0.003) else round(t0, 6)
        update_time = None if rng.random() < 0.01 else round(self.t + rng.uniform(0, 3600), 6)
        conv = {"title": self.title, "create_time": create_time, "update_time": update_time, "mapping": mapping,
                "moderation_results": [], "current_node": current, "plugin_ids": None}
        cid = self._uuid()
        if self.era > 0:
            conv["conversation_id"] = cid
        conv.update({"conversation_template_id": None, "gizmo_id": None, "is_archived": False,
                     "safe_urls": [], "default_model_slug": self.model})
        if self.era == 2:
            conv.update({"gizmo_type": None, "is_starred": None, "conversation_origin": None, "voice": None,
                         "async_status": None, "disabled_tool_ids": [], "is_do_not_remember": False,
                         "memory_scope": "global_enabled", "sugar_item_id": None})
        conv["id"] = cid
        return conv, self.n_messages, dialogue

    def _rare(self, index: int, slot: int, p: float) -> bool:
        """A rare feature: chance p, and at least once every _RARE_EVERY conversations so small exports show it."""
        return (not self.demo and index % _RARE_EVERY == slot) or self.rng.random() < p

    def _turn_kinds(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        if self.topic["foreign"]:
            return ("plain", "thinking"), (85, 15 if self.era == 2 else 0)
        if self.era == 0:
            return ("plain", "python", "browser", "image"), (80, 8, 8, 4)
        if self.era == 1:
            return ("plain", "image", "python", "browser", "bio", "canmore"), (72, 7, 8, 5, 4, 4)
        return ("plain", "thinking", "webrun", "python", "image", "canmore", "bio"), (56, 14, 10, 6, 6, 5, 3)


# ---------------------------------------------------------------------------
# Claude.ai conversations: a flat list of messages linked by parent_message_uuid.


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _ClaudeBuilder:
    """Builds one Claude.ai conversation dict at a time, sized to a byte target."""

    def __init__(self, rng: random.Random, pool: _TextPool, *, demo: bool):
        self.rng = rng
        self.pool = pool
        self.demo = demo
        self.account = "%032x" % rng.getrandbits(128)
        self.ratio = 1.0

    def learn(self, actual: int) -> None:
        """Compare the last conversation's estimated and real JSON size, so later ones land closer."""
        if self.est > 5_000:
            self.ratio = 0.8 * self.ratio + 0.2 * min(3.0, max(0.3, actual / self.est))

    def _uuid(self) -> str:
        h = "%032x" % self.rng.getrandbits(128)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:]}"

    def _block(self, kind: str, **fields) -> dict:
        start = self.t
        self.t += self.rng.uniform(0.5, 20)
        return {"start_timestamp": _iso(start), "stop_timestamp": _iso(self.t), "flags": None, "type": kind, **fields}

    def _start(self) -> str:
        """Move the clock to a new message: its created_at, which its blocks then follow."""
        self.t += self.rng.uniform(3, 120)
        return _iso(self.t)

    def _message(self, sender: str, parent: str, blocks: list[dict], created: str) -> str:
        rng = self.rng
        texts = [b["text"] for b in blocks if b["type"] == "text"]
        text = "\n\n".join(texts)
        r = rng.random()
        if any(b["type"] == "tool_use" for b in blocks):
            # The flat text field renders tool use as a placeholder the blocks don't contain.
            text = "\n```\nThis block is not supported on your current device yet.\n```\n\n" + text
        elif r < 0.03:
            text = ""  # the flat field is sometimes empty while the blocks hold the message
        elif r < 0.05:
            # Or stale: an earlier version of the message.
            text = self.pool.context(rng, self.topic) if sender == "human" else self.pool.short(rng, self.topic)
        uid = self._uuid()
        attachments = []
        if sender == "human" and not self.demo and rng.random() < 0.03:
            doc = "\n\n".join(rng.choices(self.topic["paragraphs"], k=rng.randint(1, 4)))
            attachments.append({"file_name": "notes.txt", "file_size": len(doc.encode()), "file_type": "txt",
                                "extracted_content": doc})
        self.messages.append({"uuid": uid, "text": text, "content": blocks, "sender": sender,
                              "index": len(self.messages), "created_at": created, "updated_at": _iso(self.t),
                              "truncated": False, "attachments": attachments, "files": [],
                              "parent_message_uuid": parent})
        self.est += 330 + 230 * len(blocks) + len(text) + sum(len(b.get("text", "")) + len(b.get("thinking", ""))
                                                               for b in blocks)
        return uid

    def human(self, parent: str, first: bool) -> str:
        rng = self.rng
        created = self._start()
        if not self.demo and self.target > 60_000 and rng.random() < (0.05 if self.target > 900_000 else 0.002):
            q = self.pool.long_text(rng, self.topic)
        else:
            q = self.pool.question(rng, self.topic, first, self.verbosity)
        return self._message("human", parent, [self._block("text", text=q, citations=[])], created)

    def assistant(self, parent: str) -> str:
        rng, topic = self.rng, self.topic
        created = self._start()
        blocks = []
        if rng.random() < 0.25:
            blocks.append(self._block("thinking", thinking=" ".join(rng.sample(topic["sentences"], 3)),
                                      summaries=[{"summary": f"Thinking about {rng.choice(topic['things'])}"}],
                                      cut_off=False))
        if rng.random() < 0.12:
            query = rng.choice(topic["goals"])
            blocks.append(self._block("tool_use", name="web_search", input={"query": query},
                                      message="Searching the web", integration_name=None, context=None,
                                      display_content=None))
            blocks.append(self._block("tool_result", name="web_search", is_error=False, message=None,
                                      content=[{"type": "text", "text": self.pool.short(rng, topic),
                                                "uuid": self._uuid()} for _ in range(3)]))
        blocks.append(self._block("text", text=self.pool.reply(rng, topic, self.verbosity), citations=[]))
        return self._message("assistant", parent, blocks, created)

    def conversation(self, target: int, t0: float, index: int) -> tuple[dict, int, bool]:
        """Return (conversation dict, message count, has dialogue) of about target bytes of JSON."""
        rng = self.rng
        self.target, self.t, self.messages, self.est = target, t0, [], 350
        self.topic = self.pool.topic(rng)
        self.verbosity = 1.0 if self.demo else min(4.0, max(1.0, (target / 16_000) ** 0.3))
        p_branch = 0.12 if self.demo else 0.05
        name = "" if rng.random() < 0.03 else rng.choice(self.topic["titles"])
        dialogue = self.demo or rng.random() >= 0.01
        tip = CLAUDE_ROOT
        while dialogue and (self.est < target / self.ratio or not self.messages):
            if rng.random() < p_branch:
                # An edited question: the earlier version and its answer stay as a side branch.
                self.assistant(self.human(tip, not self.messages))
            h = self.human(tip, not self.messages)
            if rng.random() < p_branch:
                self.assistant(h)  # a regenerated answer
            tip = self.assistant(h)
        conv = {"uuid": self._uuid(), "name": name, "summary": "", "created_at": _iso(t0),
                "updated_at": _iso(self.t + rng.uniform(0, 3600)), "account": {"uuid": self.account},
                "chat_messages": self.messages}
        return conv, len(self.messages), dialogue
