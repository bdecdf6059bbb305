"""Texts that exercise tokenization: English, code, emoji (multi-codepoint too), CJK,
accented and combining characters, whitespace runs, and special-token look-alikes."""

CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (let i = 0; i < 10; i++) { console.log(`i=${i}`); }",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Accents: café, naïve, résumé, Ångström, São Paulo, Straße, Dvořák.",
    "Combining: e\u0301 a\u0308 n\u0303 — and math: ∑ ∫ √ ≤ ≥ ≠ π.",
    "   leading spaces, trailing spaces   \n\n\ttabs\tand\r\nnewlines",
    "Mixed: Hello世界🌍! Ça va? 😀😀😀",
    "Special look-alikes: <|im_start|>user\nhi<|im_end|> <|endoftext|>",
    "Numbers 1234567890 3.14159 -42 1e-9 0xDEADBEEF",
    "😀",
    "a",
]
