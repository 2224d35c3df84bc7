"""The model-free quality profile: each measure on small hand-computed cases, and each flag against human labels."""

import dataclasses
import json
import socket
from pathlib import Path

import pytest

from apiana_lab import quality
from apiana_lab.quality import (
    FLAGS,
    QualityProfile,
    Thresholds,
    load_labels,
    profile,
    score_flags,
    summarize_profiles,
    tokenize,
)

LABELS_PATH = Path(__file__).parent / "data" / "quality_labels.jsonl"

# Each flag must agree with the human labels at least this well (tests/data/quality_labels.jsonl).
# The thresholds were chosen on that set, so this guards the rules against drift; it is not a
# held-out estimate (results/bench-quality/labels.md says so too).
PRECISION_FLOOR = 0.8
RECALL_FLOOR = 0.8
MIN_POSITIVES = 3

EN_CHUNK = (
    "User: I want to run a half marathon in October, but my knees hurt after long runs. What should I do?\n\n"
    "Assistant: Knee pain often comes from adding mileage too fast. Increase your weekly distance by at most ten "
    "percent and run most miles at an easy pace. Two short strength sessions a week for the hips help too."
)
FR_CHUNK = (
    "User: J'ai un chat de deux ans qui griffe le canapé. Comment l'en empêcher ?\n\n"
    "Assistant: Donne-lui un griffoir stable et assez haut, placé juste à côté du canapé. Récompense-le quand il "
    "l'utilise. Tu peux aussi couvrir le canapé avec une couverture pendant quelques semaines."
)
EN_MEMORY = (
    "The user told me they wanted to run a half marathon in October and that their knees hurt after long runs. "
    "I explained that knee pain often comes from adding mileage too fast, and I suggested two strength sessions "
    "a week. I should have asked where exactly it hurt."
)


# --- measures ----------------------------------------------------------------------------------------


def test_tokens_are_words_with_inner_apostrophes_and_single_characters_of_unspaced_scripts():
    assert tokenize("I'm here. J’ai dit: OK!") == ["i'm", "here", "j'ai", "dit", "ok"]
    assert tokenize("日本語の漢字") == ["日", "本", "語", "の", "漢", "字"]
    assert tokenize("ภาษา and 中文") == ["ภ", "า", "ษ", "า", "and", "中", "文"]


def test_coverage_and_density_match_a_hand_computed_example():
    source = tokenize("the cat sat on the mat")
    summary = tokenize("the cat sat on a mat")
    # Fragments: "the cat sat on" (4), "a" is new, "mat" (1). Coverage 5/6, density (16 + 1)/6.
    assert quality.fragments(summary, source) == [4, 1]
    coverage, density, longest = quality.coverage_density(summary, source)
    assert coverage == pytest.approx(5 / 6)
    assert density == pytest.approx(17 / 6)
    assert longest == 4


def test_fragments_take_the_longest_match_not_the_first():
    source = tokenize("a b c x a b c d")
    assert quality.fragments(tokenize("a b c d"), source) == [4]
    assert quality.coverage_density(tokenize("entirely novel words"), source) == (0.0, 0.0, 0)
    assert quality.coverage_density([], source) == (0.0, 0.0, 0)


def test_profile_reports_length_and_compression():
    p = profile("one two three four", "a b c d e f g h")
    assert (p.tokens, p.source_tokens, p.compression) == (4, 8, 0.5)
    assert p.coverage == 0.0 and p.longest_copied == 0


def test_repetition_counts_repeated_ngrams_and_the_longest_repeated_span():
    tokens = tokenize("a b c d a b c d a b c d")
    share, longest = quality.repetition(tokens)
    assert share == pytest.approx(5 / 9)  # 9 word 4-grams, 4 distinct
    assert longest == 8  # "a b c d a b c d" occurs twice, overlapping
    assert quality.repetition(tokenize("every word here is new to this text")) == (0.0, 0)


def test_repeats_the_chunk_already_has_are_not_a_loop():
    chunk = "Assistant: " + "Taste and season just before serving. " * 4
    copied = tokenize("Taste and season just before serving. " * 3)
    assert quality.repetition(copied, tokenize(chunk))[0] == 0.0
    assert quality.repetition(copied)[0] > 0.5  # against nothing, the same text repeats itself


def test_cycling_short_lines_count_as_repeated_sentences():
    cycling = "I told them about the guitar.\n\nBien,\n\nPoules.\n\nBien,\n\nFéminin,\n\nPoules.\n\nBien,"
    assert quality.repeated_sentences(cycling) == pytest.approx(3 / 7)
    assert quality.repeated_sentences(cycling, "Bien,\nBien,\nBien,\nPoules.\nPoules.") == 0.0  # the chunk's own
    assert quality.repeated_sentences(EN_MEMORY) == 0.0
    assert "loop" in profile(cycling, FR_CHUNK, "stop").flags


def test_a_looping_summary_is_flagged_and_a_plain_one_is_not():
    looped = "I told the user to rest. " + "I suggested that they slow down the easy runs. " * 6
    p = profile(looped, EN_CHUNK, "stop")
    assert p.repeated_ngrams > 0.5 and p.longest_repeat >= 40
    assert "loop" in p.flags
    assert "loop" not in profile(EN_MEMORY, EN_CHUNK, "stop").flags


def test_cjk_repetition_uses_character_ngrams():
    sentence = "私は清水寺と祇園を午前中に回ることをすすめました。"
    assert quality._ngram_size(tokenize(sentence)) == 8
    opening, chunk = (
        "ユーザーは京都について聞きました。",
        "User: 京都で三日間過ごすなら、どこを回るのがおすすめですか？",
    )
    p = profile(opening + sentence * 5, chunk, "stop")
    assert p.tokens == len(opening + sentence * 5) - 6  # one token a character, the six 。 left out
    assert "loop" in p.flags
    once = profile(opening + sentence, chunk, "stop")
    assert once.repeated_ngrams == 0.0 and "loop" not in once.flags


def test_transcript_echo_counts_role_labels_and_turn_lines():
    echo = "User: My knees hurt.\n\nAssistant: Run slower.\n\nUser: Thanks!"
    p = profile(echo, EN_CHUNK, "stop")
    assert (p.role_markers, p.turn_lines) == (3, 3)
    assert "echo" in p.flags
    one_line = profile("Human: my knees hurt. AI: run slower and add strength work.", EN_CHUNK, "stop")
    assert one_line.role_markers == 2 and "echo" in one_line.flags
    small_model = profile('The user: "My knees hurt."\nThe user\'s response: "Thanks."', EN_CHUNK, "stop")
    assert small_model.turn_lines == 2 and "echo" in small_model.flags
    for header in (
        'Conversation "Running" (2026-01-05):',
        '<<Conversation "京都旅行の計画">>',
        '"Running Pace Zones" (2026-01-05)',
    ):
        assert "echo" in profile(header + "\n\nI told the user to slow down.", EN_CHUNK, "stop").flags, header
    prose = (
        'Conversation "Running" was about knee pain, and I told the user to add mileage slowly and to rest more often.'
    )
    assert "echo" not in profile(prose, EN_CHUNK, "stop").flags
    chunk_label = profile("Tool output (bio): Model set context updated.", EN_CHUNK, "stop")
    assert chunk_label.role_markers == 1 and "echo" in chunk_label.flags
    assert (
        "echo"
        not in profile("The user asked me why their knees hurt; as the assistant, I said: slow down.", EN_CHUNK).flags
    )


def test_truncated_needs_the_token_cap_and_a_sentence_left_open():
    cut = "The user asked me about knee pain and I explained that"
    assert profile(cut, EN_CHUNK, "length").flags >= {"truncated"}
    assert "truncated" not in profile(cut, EN_CHUNK, "stop").flags  # stopped on its own
    assert "truncated" not in profile(cut + " it gets better.", EN_CHUNK, "length").flags
    assert "truncated" not in profile(cut, EN_CHUNK, None).flags
    assert not quality.ends_mid_sentence("I wished them luck! 🚀")
    assert not quality.ends_mid_sentence('I said "slow down."')
    assert not quality.ends_mid_sentence("ありがとうございました。")
    assert quality.ends_mid_sentence("I wished them")


def test_language_is_compared_with_the_chunk_when_both_are_long_enough():
    english_of_french = profile(
        "The user told me that her two-year-old cat scratches the sofa. I advised a sturdy scratching post next to "
        "the sofa and rewards when the cat uses it.",
        FR_CHUNK,
        "stop",
    )
    assert (english_of_french.language, english_of_french.source_language) == ("en", "fr")
    assert "wrong_language" in english_of_french.flags
    french = profile(
        "L'utilisatrice m'a expliqué que son chat griffait le canapé, et je lui ai conseillé un griffoir "
        "stable juste à côté.",
        FR_CHUNK,
        "stop",
    )
    assert french.language == "fr" and "wrong_language" not in french.flags
    short = profile("I suggested a scratching post.", FR_CHUNK, "stop")
    assert short.language is None and "wrong_language" not in short.flags


def test_the_chunks_language_comes_from_its_dialogue_not_its_code_or_tool_traffic():
    chunk = (
        "Code (python): import os\nprint(os.getcwd())\nfor name in os.listdir(): print(name, 'is a file')\n\n"
        "Code output: /home/user/projects/report\n\nUser: Merci, et comment je supprime le dossier ?\n\n"
        "Assistant: Utilise shutil.rmtree avec prudence, après avoir vérifié le chemin."
    )
    assert (
        profile(
            "Je lui ai expliqué comment supprimer le dossier avec prudence, après avoir vérifié le chemin.", chunk
        ).source_language
        == "fr"
    )


def test_a_chunk_that_mixes_languages_accepts_either():
    mixed = "User: [image]\nこれは何ですか？ I'm trying to find duplicate rows."
    p = profile(
        "The user sent me a screenshot and asked how to find duplicate rows; I suggested a composite index.", mixed
    )
    assert p.source_language == "ja" and p.language == "en"
    assert "wrong_language" not in p.flags


@pytest.mark.parametrize(
    "memory, language",
    [
        (EN_MEMORY, "en"),
        (
            "Je lui ai conseillé un griffoir stable, et j'ai retenu qu'il vaut mieux "
            "proposer une alternative que d'interdire.",
            "fr",
        ),
        ("Der Nutzer erzählte mir von seinen Knieschmerzen, und ich habe ihm geraten, langsamer zu laufen.", "de"),
        ("El usuario me contó que quería aprender Python y yo le sugerí un curso corto de fundamentos.", "es"),
        ("L'utente mi ha chiesto cosa preparare in anticipo e io ho suggerito una lasagna alle verdure.", "it"),
        ("O utilizador contou-me que queria mudar de carreira e eu sugeri um curso online de design gráfico.", "pt"),
        ("De gebruiker vertelde me dat hij zijn zolder wilde isoleren, en ik legde uit hoe dat moet.", "nl"),
    ],
)
def test_first_person_memories_are_recognised_in_each_known_language(memory, language):
    p = profile(memory, EN_CHUNK)
    assert p.language == language
    assert p.voice == "first" and p.first_person >= 1
    assert "not_first_person" not in p.flags


def test_first_person_verbs_count_where_pronouns_are_dropped():
    spanish = profile(
        "Le sugerí al usuario un curso corto de fundamentos. Cuando dijo que temía aburrirse, le recomendé "
        "cambiar de proyecto. Aprendí que la constancia le preocupaba más.",
        EN_CHUNK,
    )
    assert spanish.language == "es" and spanish.voice == "first"
    third = profile(
        "El usuario quería aprender Python. El asistente recomendó un curso corto y, en los próximos días, "
        "un proyecto pequeño; así se sintió más seguro aquí.",
        EN_CHUNK,
    )
    assert third.language == "es" and third.voice == "other"


def test_a_third_person_summary_is_flagged():
    p = profile(
        "The user had knee pain after long runs. The assistant suggested adding mileage slowly and doing "
        "strength work twice a week.",
        EN_CHUNK,
        "stop",
    )
    assert (p.voice, p.first_person) == ("other", 0)
    assert "not_first_person" in p.flags


def test_voice_is_unknown_for_a_language_whose_pronouns_are_not_known():
    russian = profile(
        "Пользователь попросил меня составить план тренировок, и я посоветовал начать с приседаний и "
        "отжиманий три раза в неделю.",
        "User: Составь, пожалуйста, план тренировок на три дня в неделю.",
    )
    assert russian.language == "ru"
    assert russian.voice == "unknown" and "not_first_person" not in russian.flags


def test_voice_ignores_quoted_turns():
    # The only "I" is the user's, inside a copied turn: the summary itself has no narrator to judge.
    p = profile('The user: "I want to run a half marathon but my knees hurt after long runs."', EN_CHUNK, "stop")
    assert p.voice == "unknown"


@pytest.mark.parametrize("summary", ["", "   \n\n ", "...", "🙂"])
def test_empty_summaries_carry_only_the_empty_flag(summary):
    p = profile(summary, EN_CHUNK, "length")
    assert p.flags == frozenset({"empty"})
    assert p.tokens == 0 and p.voice == "unknown" and p.language is None


def test_thresholds_can_be_moved():
    looped = "I suggested that they slow down the easy runs. " * 4
    assert "loop" in profile(looped, EN_CHUNK).flags
    lenient = Thresholds(loop_repeated_share=0.99, loop_repeated_sentences=0.99, loop_repeated_span=1000)
    assert "loop" not in profile(looped, EN_CHUNK, thresholds=lenient).flags


# --- the profile as data -----------------------------------------------------------------------------


def test_to_dict_is_json_and_from_dict_restores_the_profile():
    p = profile("User: hi\n\nAssistant: hello", EN_CHUNK, "length")
    d = json.loads(json.dumps(p.to_dict()))
    assert d["flags"] == sorted(p.flags)
    assert set(d) == {f.name for f in dataclasses.fields(QualityProfile)}
    assert QualityProfile.from_dict(d) == p
    assert QualityProfile.from_dict({**d, "judge_score": 0.4}) == p  # a later scorer's keys are left out


def test_summarize_profiles_counts_flags_and_takes_medians():
    profiles = [
        profile(EN_MEMORY, EN_CHUNK, "stop"),
        profile("", EN_CHUNK, "stop"),
        profile("User: hi\n\nAssistant: hello", EN_CHUNK, "stop"),
    ]
    extra = {**profiles[0].to_dict(), "flags": ["judge_disagrees"], "judge_score": 0.25}  # a later scorer's record
    s = summarize_profiles(profiles + [extra])
    assert s["count"] == 4
    assert s["flagged"] == 3 and s["flagged_share"] == 0.75
    assert list(s["flags"])[: len(FLAGS)] == list(FLAGS)
    assert s["flags"]["empty"] == {"count": 1, "share": 0.25}
    assert s["flags"]["echo"]["count"] == 1
    assert s["flags"]["judge_disagrees"] == {"count": 1, "share": 0.25}
    tokens = sorted([profiles[0].tokens, 0, profiles[2].tokens, profiles[0].tokens])
    assert s["medians"]["tokens"] == (tokens[1] + tokens[2]) / 2
    assert s["medians"]["judge_score"] == 0.25
    assert "ends_mid_sentence" not in s["medians"]  # a bool is not a measure to take a median of
    assert summarize_profiles([]) == {
        "count": 0,
        "flagged": 0,
        "flagged_share": 0.0,
        "flags": {f: {"count": 0, "share": 0.0} for f in FLAGS},
        "medians": {},
    }


# --- the detector ------------------------------------------------------------------------------------


def test_the_detector_loads_from_its_wheel_without_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(quality, "_detector", None)
    assert quality.detect_language("Je lui ai conseillé un griffoir stable juste à côté du canapé.") == "fr"
    assert set(quality._get_detector().labels) == set(quality.LANGUAGES)


def test_the_detector_ranks_as_py3langids_own_loader_does():
    """Our leaner load of the bundled model (no second copy of its tables) gives the very same ranks."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    reference.set_languages(quality.LANGUAGES)
    ours = quality._get_detector()
    texts = [t for r in load_labels(LABELS_PATH) for t in (r["chunk"][:200], r["summary"][:200])]
    texts += [EN_CHUNK, FR_CHUNK, "", "これは何ですか？", "Привет, как дела?", "مرحبا كيف حالك"]
    assert len({reference.rank(t)[0][0] for t in texts}) >= 5  # several languages, not one text many times
    assert [ours.rank(t) for t in texts] == [reference.rank(t) for t in texts]


# --- against human labels ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled():
    records = load_labels(LABELS_PATH)
    return records, score_flags(records)


def test_the_labelled_set_is_varied(labelled):
    records, _ = labelled
    origins = {r["origin"] for r in records}
    assert origins == {"model", "hand", "made"}
    assert sum(r["origin"] == "model" for r in records) >= 30
    good_languages = {r["chunk_language"] for r in records if r["origin"] == "hand"}
    assert len(good_languages & set(quality.FIRST_PERSON)) >= 3


@pytest.mark.parametrize("flag", FLAGS)
def test_each_flag_agrees_with_the_human_labels(labelled, flag):
    _, result = labelled
    s = result["flags"][flag]
    assert s["positives"] >= MIN_POSITIVES, f"{flag}: only {s['positives']} labelled positives"
    assert s["precision"] is not None and s["precision"] >= PRECISION_FLOOR, (flag, s, result["misses"].get(flag))
    assert s["recall"] >= RECALL_FLOOR, (flag, s, result["misses"].get(flag))
