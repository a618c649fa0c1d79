"""Parsers for the reply formats small models actually produce, and the refusal detector."""

from __future__ import annotations

from conftest import client_of

from unifit.generation.parsing import clean_item, name_survives_cut, normalise_concept, parse_list, parse_qa
from unifit.llm.asking import ask
from unifit.llm.base import Completion, GenerationParams
from unifit.text import is_refusal


def test_numbered_list_with_preamble_markup_and_descriptions() -> None:
    reply = ("Sure! Here are 3 sub-concepts for DNS:\n\n"
             "1. **DNS Cache Poisoning**: an attacker inserts forged records into a resolver cache.\n"
             "   - Kaminsky attack\n"
             "2) Zone   Transfers.\n"
             "3. `DNSSEC` - signing zones so resolvers can verify the answers they receive")
    assert parse_list(reply) == ["DNS Cache Poisoning", "Zone Transfers", "DNSSEC"]


def test_bullets_json_array_json_object_and_fenced_json() -> None:
    assert parse_list("- SPF\n* DKIM;\n• DMARC") == ["SPF", "DKIM", "DMARC"]
    assert parse_list('["SPF", "DKIM ", "**DMARC**"]') == ["SPF", "DKIM", "DMARC"]
    assert parse_list('Here you go: {"concepts": ["Open relays", "Greylisting"]}') == ["Open relays", "Greylisting"]
    assert parse_list('```json\n[{"name": "MX records"}, {"name": "PTR records"}]\n```') == ["MX records", "PTR records"]


def test_plain_short_lines_accepted_prose_and_broken_json_rejected() -> None:
    assert parse_list("Anycast routing\nEdge caching\nOrigin shielding") == ["Anycast routing", "Edge caching", "Origin shielding"]
    assert parse_list("I'm sorry, but I can't help with generating sub-concepts for this topic right now.") is None
    assert parse_list('{"concepts": ["Open relays", "Grey') is None
    assert parse_list("[]") == []  # an explicit empty list: the concept is atomic


def test_normalise_concept_and_clean_item() -> None:
    assert normalise_concept("  3.  **Certificate   Pinning**.  ") == "Certificate Pinning"
    assert normalise_concept('"Subconcept 2: BGP hijacking"') == "BGP hijacking"
    assert clean_item("2. Explain how **SPF** works?") == "Explain how SPF works?"


def test_qa_numbered_markdown_and_short_forms() -> None:
    reply = ("Here are two questions:\n**Question 1:** What is SPF?\n**Answer 1:** SPF lists the hosts allowed to send mail.\n"
             "It is a TXT record.\n\nQuestion 2: What is DKIM?\nAnswer 2: DKIM signs messages with a domain key.")
    assert parse_qa(reply) == [("What is SPF?", "SPF lists the hosts allowed to send mail.\nIt is a TXT record."),
                               ("What is DKIM?", "DKIM signs messages with a domain key.")]
    assert parse_qa("Q: What is a CDN?\nA: A network of edge caches.") == [("What is a CDN?", "A network of edge caches.")]


def test_qa_json_forms_and_failures() -> None:
    assert parse_qa('[{"question": "What is PKI?", "answer": "Public key infrastructure."}]') == [("What is PKI?", "Public key infrastructure.")]
    assert parse_qa('{"items": [{"Q": "Why OCSP?", "A": "To check revocation."}]}') == [("Why OCSP?", "To check revocation.")]
    assert parse_qa("Question 1: What is BGP?\n") is None  # a question without an answer is not a pair
    assert parse_qa("BGP is the routing protocol of the internet.") is None


def test_answer_lines_that_look_like_lists_stay_in_the_answer() -> None:
    reply = "Question: How to harden SMTP?\nAnswer: Do three things:\na. require TLS\nb. disable open relay\nc. rate limit"
    [(question, answer)] = parse_qa(reply)
    assert question == "How to harden SMTP?" and answer.endswith("c. rate limit") and "a. require TLS" in answer


def test_refusals() -> None:
    assert is_refusal("I'm sorry, but I cannot help with that.")
    assert is_refusal("As an AI language model, I don't have opinions.")
    assert is_refusal("I can’t provide that information.")
    assert not is_refusal("DNSSEC adds signatures to DNS records; resolvers verify them.")


def test_ask_retries_only_failures_with_new_seeds() -> None:
    seen: list[tuple[str, int]] = []

    def generate(conversations, params):
        seen.extend((c[-1]["content"], params.seed) for c in conversations)
        return [Completion("1. ok" if c[-1]["content"] == "good" or params.seed >= 7 else "no list here", "stop") for c in conversations]

    results = ask(client_of(generate), [[{"role": "user", "content": p}] for p in ("good", "bad")], GenerationParams(seed=5), parse_list,
                  max_retries=3)
    assert [r.value for r in results] == [["ok"], ["ok"]]
    assert [r.attempts for r in results] == [1, 3]
    assert seen == [("good", 5), ("bad", 5), ("bad", 6), ("bad", 7)]


def test_name_survives_cut_only_when_a_description_follows_the_name() -> None:
    assert name_survives_cut("1. SPF\n2. **Open relays** are servers th")
    assert name_survives_cut("1. SPF\n2. Open relays: servers th")
    assert not name_survives_cut("1. SPF\n2. Open rel")
