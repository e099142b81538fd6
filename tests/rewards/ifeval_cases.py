"""Per-instruction IFEval cases: kwargs, responses that follow, responses that violate."""

from __future__ import annotations

EN = "This is an English sentence about the weather today and the plans we make."

# id -> (kwargs, responses that follow, responses that violate)
CASES: dict[str, tuple[dict, list[str], list[str]]] = {
    "keywords:existence": (
        {"keywords": ["apple", "banana"]},
        ["I like apple and Banana.", "BANANA, apple!"],
        ["I like apple only.", "pineapple and bananas"],
    ),
    "keywords:frequency": (
        {"keyword": "cat", "frequency": 3, "relation": "at least"},
        ["cat, Cat and CAT.", "cat cat cat cat"],
        ["cat and cat", "cats cats cats"],
    ),
    "keywords:forbidden_words": (
        {"forbidden_words": ["bad", "evil"]},
        ["All good here.", "A badge is fine.", "\u0431\u0430\u0434 is Cyrillic, not a look-alike"],
        # look-alikes a reader takes for the word: Cyrillic a, zero-width space, soft hyphen,
        # strike-through marks, full-width and mathematical bold letters, Greek capitals
        ["That is EVIL.", "not bad", "not b\u0430d", "ev\u200bil", "e\u00advil",
         "e\u0336v\u0336i\u0336l\u0336", "\uff45\uff56\uff49\uff4c",
         "\U0001d41b\U0001d41a\U0001d41d", "\u0395VIL"],
    ),
    "keywords:letter_frequency": (
        {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
        ["Zebras zoom.", "zz"],
        ["One zebra.", "none"],
    ),
    "language:response_language": (
        {"language": "fr"},
        ["Bonjour, je suis très content de vous voir aujourd'hui, mon ami."],
        [EN, "12345 !!!"],
    ),
    "length_constraints:number_sentences": (
        {"num_sentences": 3, "relation": "less than"},
        ["One sentence. Two sentences.", "Dr. Smith met Mr. Jones. They talked."],
        ["One. Two. Three.", "First! Second? Third."],
    ),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2},
        ["First paragraph.\n***\nSecond paragraph.", "***\nA\n***\nB\n***"],
        ["Only one paragraph.", "A\n***\n***\nB", "A\n***\nB\n***\nC"],
    ),
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "at least"},
        ["one two three four five", "It's a lovely, sunny day."],
        ["one two", ""],
    ),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        ["Intro text.\n\nHowever, this is it.", "Intro.\n\n**However** we go on."],
        ["Intro.\n\nBut no.", "However.\n\nHowever.\n\nHowever.", "Intro. However, one paragraph."],
    ),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        ["Dear [name], you live at [address].", "[a] [b] [c]"],
        ["Dear [name].", "Dear [ ] and []", "[[] [[]", "[" + " " * 100_000 + "]"],
    ),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."},
        ["Hi there.\n\nP.S. See you soon.", "Hello.\n**P. S.** Bring snacks."],
        ["Hi there. See you soon.", "I wrote a PS without the marker."],
    ),
    "detectable_format:number_bullet_lists": (
        {"num_bullets": 2},
        ["Intro:\n* first\n* second", "- one\n- two\nThe end."],
        ["* a\n* b\n* c", "**bold** text\n* only one", "no bullets"],
    ),
    "detectable_format:constrained_response": (
        {},
        ["My answer is yes.", "Let me think. My answer is maybe."],
        ["Yes.", "my answer is yes"],
    ),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        ["*one* and *two*", "**bold** plus *italic*"],
        ["*one* only", "** ** and * *"],
    ),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        ["Section 1\nIntro\nSection 2\nBody", "Section 1 a Section 2 b Section 3 c"],
        ["Section 1\nIntro only", "section 1 a section 2 b"],
    ),
    "detectable_format:json_format": (
        {},
        ['{"a": 1, "b": [1, 2]}', '```json\n{"a": 1}\n```', "[1, 2, 3]"],
        ["{a: 1}", 'Here is JSON: {"a": 1}', "[" * 100_000],
    ),
    "detectable_format:title": (
        {},
        ["<<My Title>>\nSome text.", "Text then <<poem of joy>>"],
        ["My Title\nSome text.", "<<>> empty", "<<\n>>", "<" * 100_000 + "\n>>"],
    ),
    "combination:two_responses": (
        {},
        ["Answer one.\n******\nAnswer two.", "******\nA\n******\nB\n******"],
        ["Same.\n******\nSame.", "Only one.", "A\n******\nB\n******\nC"],
    ),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "Write a poem about cats."},
        ["Write a poem about cats. Cats are soft.", "write a poem about cats.\nMeow."],
        ["Here is a poem about cats.", "Poem: Write a poem about cats."],
    ),
    "startend:end_checker": (
        {"end_phrase": "Is there anything else I can help with?"},
        [
            "Done. Is there anything else I can help with?",
            "x is there anything else i can help with?  ",
        ],
        ["Is there anything else I can help with? Thanks.", "Done."],
    ),
    "change_case:capital_word_frequency": (
        {"capital_frequency": 2, "capital_relation": "at least"},
        ["This is VERY IMPORTANT.", "NASA and ESA"],
        ["This is VERY important.", "no capitals"],
    ),
    "change_case:english_capital": (
        {},
        [EN.upper()],
        [EN, "BONJOUR, JE SUIS TRÈS CONTENT DE VOUS VOIR AUJOURD'HUI, MON AMI."],
    ),
    "change_case:english_lowercase": (
        {},
        [EN.lower()],
        [EN, "bonjour, je suis très content de vous voir aujourd'hui, mon ami."],
    ),
    "punctuation:no_comma": (
        {},
        ["No commas here. None at all.", "Semi; colons: fine."],
        ["One, two.", "全角，逗号", "small\ufe50comma", "arabic\u060ccomma", "list\u3001of",
         "half\uff64width"],
    ),
    "startend:quotation": (
        {},
        ['"Wrapped in quotes."', "  \u201cCurly quotes.\u201d  "],
        ["Not wrapped.", '"Half wrapped.', '"'],
    ),
}
