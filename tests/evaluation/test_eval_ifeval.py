"""IFEval scoring: every one of the 25 instruction types against hand-checked responses, Google's metric
definitions on a hand-made table, agreement with if-verifiable's own per-sample evaluation, and NLTK's punkt
sentence splitting from the packaged model."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest
from conftest import SHARED_DATA

from unifit.evaluation.ifeval import check_response, load_prompts, score

# (instruction id, kwargs, response, strict, loose); strict/loose checked by hand against Google's definitions
CASES = [
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 3}, "ONLY TWO capitals here.", True, True),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 3}, "FOUR CAPITAL WORDS HERE.", False, False),
    ("change_case:english_capital", {}, "THIS IS A LONG ENGLISH SENTENCE WRITTEN ENTIRELY IN CAPITAL LETTERS FOR THE TEST.", True, True),
    ("change_case:english_capital", {}, "This is a long English sentence that is not written in capital letters.", False, False),
    ("change_case:english_lowercase", {}, "this is a long english sentence written entirely in lowercase letters for the test.", True, True),
    ("change_case:english_lowercase", {}, "Sure!\nthis is a long english sentence written entirely in lowercase letters for the test.", False, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."}, "Write a poem about cats.\nCats sleep all day.", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."}, "Cats sleep all day.", False, False),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True, True),
    ("combination:two_responses", {}, "Only one answer.", False, False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], you live at [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], hello.", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello there.\nP.S. See you soon.", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello there. See you soon.", False, False),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "Yes, definitely.", False, False),
    ("detectable_format:json_format", {}, '{"name": "Ada", "age": 36}', True, True),
    ("detectable_format:json_format", {}, "name: Ada, age: 36", False, False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}, "SECTION 1\nIntro.\nSECTION 2\nBody.", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}, "SECTION 1\nIntro only.", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first point\n* second point", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first point\n* second point\n* third point", False, True),  # loose: a line dropped
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "This is *important* and *urgent*.", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "This is *important* only.", False, False),
    ("detectable_format:title", {}, "<<A Day at Sea>>\nThe waves were high.", True, True),
    ("detectable_format:title", {}, "A Day at Sea\nThe waves were high.", False, False),
    ("keywords:existence", {"keywords": ["alpha", "beta"]}, "Both alpha and beta are Greek letters.", True, True),
    ("keywords:existence", {"keywords": ["alpha", "beta"]}, "Only alpha is here.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "I enjoy jazz and blues.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "I enjoy rock music.", False, False),
    ("keywords:frequency", {"relation": "at least", "keyword": "story", "frequency": 2}, "A story within a story.", True, True),
    ("keywords:frequency", {"relation": "at least", "keyword": "story", "frequency": 2}, "Just one story.", False, False),
    ("keywords:letter_frequency", {"let_relation": "at least", "letter": "a", "let_frequency": 2}, "A banana", True, True),
    ("keywords:letter_frequency", {"let_relation": "at least", "letter": "a", "let_frequency": 2}, "one bus", False, False),
    ("language:response_language", {"language": "de"}, "Das Wetter ist heute sehr schön und wir gehen am Nachmittag in den Park spazieren.", True, True),
    ("language:response_language", {"language": "de"}, "The weather is very nice today and we are going for a walk in the park this afternoon.", False, False),
    ("length_constraints:nth_paragraph_first_word", {"first_word": "weekend", "num_paragraphs": 2, "nth_paragraph": 1},
     "Weekend plans are simple.\n\nWe rest.", True, True),
    ("length_constraints:nth_paragraph_first_word", {"first_word": "weekend", "num_paragraphs": 2, "nth_paragraph": 1},
     "Monday plans are simple.\n\nWe work.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First paragraph.\n***\nSecond paragraph.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A single paragraph.", False, False),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}, "One sentence. Two sentences.", True, True),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}, "One. Two. Three. Four.", False, False),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two three four five", True, True),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two", False, False),
    ("punctuation:no_comma", {}, "No commas appear here.", True, True),
    ("punctuation:no_comma", {}, "Commas, however, appear here.", False, False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "That is all. Any other questions?", True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? That is all.", False, False),
    ("startend:quotation", {}, '"Wrapped in double quotes."', True, True),
    ("startend:quotation", {}, 'Here it is:\n"Wrapped in double quotes."', False, True),
]
def test_the_cases_cover_all_25_instruction_types() -> None:
    assert {case[0] for case in CASES} == {i for row in load_prompts() for i in row["instruction_id_list"]}
    assert len({case[0] for case in CASES}) == 25


@pytest.mark.parametrize("instruction,kwargs,response,strict,loose", CASES, ids=[f"{c[0]}-{c[3]}{c[4]}" for c in CASES])
def test_each_instruction_type_on_hand_checked_responses(instruction: str, kwargs: dict, response: str, strict: bool, loose: bool) -> None:
    row = {"key": 1, "prompt": "prompt", "instruction_id_list": [instruction], "kwargs": [kwargs]}
    (outcome,) = check_response(row, response)
    assert (outcome.strict, outcome.loose) == (strict, loose)


def test_google_metric_definitions_on_a_hand_made_table() -> None:
    rows = [
        {"key": 1, "prompt": "p1", "instruction_id_list": ["punctuation:no_comma", "detectable_format:title"], "kwargs": [{}, {}]},
        {"key": 2, "prompt": "p2", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
        {"key": 3, "prompt": "p3", "instruction_id_list": ["keywords:existence", "punctuation:no_comma", "length_constraints:number_sentences"],
         "kwargs": [{"keywords": ["alpha"]}, {}, {"relation": "less than", "num_sentences": 5}]},
        {"key": 4, "prompt": "p4", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    responses = [
        "<<Title>>\nNo commas.",  # 2/2 strict
        'Intro:\n"quoted"',  # strict fail, loose pass (first line dropped)
        "alpha is here. Nothing else.",  # existence ok, no comma ok, sentences (punkt)
        "",  # empty: every instruction fails
    ]
    result = score(rows, responses)
    assert result["n_instructions_scored"] == 7 and result["n_prompts"] == 4
    assert result["inst_level_strict"] == pytest.approx(5 / 7) and result["inst_level_loose"] == pytest.approx(6 / 7)
    assert result["prompt_level_strict"] == pytest.approx(2 / 4) and result["prompt_level_loose"] == pytest.approx(3 / 4)
    assert result["records"][1]["strict"] == [False] and result["records"][1]["loose"] == [True]


def _draws_a_letter(kwargs: dict) -> bool:
    """Google's letter-frequency verifier replaces a letter outside a-z ("#", "!") by a random one."""
    letter = kwargs.get("letter")
    return letter is not None and not (len(letter) == 1 and "a" <= letter.lower() <= "z")


def test_scores_agree_with_if_verifiable_on_the_same_responses() -> None:
    """Per prompt, our strict/loose outcomes equal the library's `evaluate_output_for_sample` on the real prompts."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    rows = load_prompts(120)
    # a mix of responses: the prompt itself, upper/lower-cased, with a title, quoted, and empty
    variants = [lambda p: p, str.upper, str.lower, lambda p: "<<Answer>>\n" + p.replace(",", ""), lambda p: f'"{p}"', lambda p: ""]
    compared = 0
    for i, row in enumerate(rows):
        response = variants[i % len(variants)](row["prompt"])
        outcomes = check_response(row, response)
        if any(_draws_a_letter(k) for k in row["kwargs"]):
            continue  # a verifier that draws a random letter (see the next test)
        sample = IFEvalSample(key=row["key"], prompt=row["prompt"], instruction_id_list=row["instruction_id_list"], kwargs=row["kwargs"])
        results, scores = evaluate_output_for_sample("ifeval", sample, response)
        mine = score([row], [response])
        assert mine["prompt_level_strict"] == scores.binary_strict and mine["prompt_level_loose"] == scores.binary_loose
        if results:
            assert [o.strict for o in outcomes] == [r.strict_pass for r in results]
            assert [o.loose for o in outcomes] == [r.loose_pass for r in results]
            assert mine["inst_level_strict"] == pytest.approx(scores.partial_strict)
        compared += 1
    assert compared >= 100


def test_verifiers_with_random_arguments_are_reproducible() -> None:
    (row,) = [r for r in load_prompts() if any(k.get("letter") == "#" for k in r["kwargs"])]  # Google's prompt 1122
    response = "".join(chr(97 + i) * (i % 6) for i in range(26))  # 0..5 of each letter: the drawn letter decides
    assert len({tuple(o.strict for o in check_response(row, response)) for _ in range(5)}) == 1


def test_prompts_ship_with_the_package_unmodified_with_licence_and_source() -> None:
    folder = resources.files("unifit.data").joinpath("ifeval")
    data = folder.joinpath("input_data.jsonl").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
    assert "Apache License" in folder.joinpath("LICENSE").read_text()
    assert "google-research" in folder.joinpath("README.md").read_text()
    assert len(load_prompts()) == 541 and [r["key"] for r in load_prompts(3)] == [json.loads(l)["key"] for l in data.decode().splitlines()[:3]]
    shared = SHARED_DATA / "ifeval_input_data.jsonl"
    if shared.exists():
        assert shared.read_bytes() == data


def test_sentences_are_split_by_nltks_english_punkt_model_without_a_download() -> None:
    """The packaged model splits like NLTK's punkt_tab English: abbreviations (Dr., p.m., Mr.) do not end a sentence."""
    import nltk

    check_response({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "x")
    found = nltk.data.find("tokenizers/punkt_tab/english/")
    assert "unifit-nltk-data-" in str(found)
    text = "Dr. Smith went to Washington. He arrived at 5 p.m. on Monday. Mr. Jones didn't."
    assert nltk.sent_tokenize(text) == ["Dr. Smith went to Washington.", "He arrived at 5 p.m. on Monday.", "Mr. Jones didn't."]
