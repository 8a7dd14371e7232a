"""PixArt-alpha's caption cleaning, as its T5 extractor applies it (`diffusion/model/t5.py`
`T5Embedder.text_preprocessing`: DeepFloyd-IF `clean_caption`, twice).

diffusers' `PixArtAlphaPipeline._clean_caption` runs the same steps except one: the official `basic_clean` strips
the text after ftfy and the double html.unescape, so a trailing "_" or "'" left by an earlier step is then at the
end and removed by the final punctuation rules. Here that order is kept, so the features match the official ones.
"""

from __future__ import annotations

import html
import re
import urllib.parse
import warnings

_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_DASHES = (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31"
           r"\uFE32\uFE58\uFE63\uFF0D]+")
_BAD_PUNCT = "[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]+"
_CJK = ["\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf", "\u4dc0-\u4dff",
        "\u4e00-\u9fff"]

# (pattern, replacement) applied in order, before and after the markup step and basic_clean
_BEFORE_MARKUP = [("<person>", "person"), (rf"\b((?:https?:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_URL_TAIL}))", ""),
                  (rf"\b((?:www:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_URL_TAIL}))", "")]
_AFTER_MARKUP = [(r"@[\w\d]+\b", ""), *((f"[{r}]+", "") for r in _CJK), (_DASHES, "-"), ("[`´«»“”¨]", '"'),
                 ("[‘’]", "'"), ("&quot;?", ""), ("&amp", ""), (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),
                 (r"\d:\d\d\s+$", ""), (r"\\n", " "), (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),
                 (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""), (r"[\"\']{2,}", '"'),
                 (r"[\.]{2,}", " "), (_BAD_PUNCT, " "), (r"\s+\.\s+", " ")]
_AFTER_BASIC = [(r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
                (r"\b\d+[a-zA-Z]+\d+\b", ""), (r"(worldwide\s+)?(free\s+)?shipping", ""),
                (r"(free\s)?download(\sfree)?", ""), (r"\bclick\b\s(?:for|on)\s\w+", ""),
                (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""), (r"\bpage\s+\d+\b", ""),
                (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "), (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
                (r"\b\s+\:\s+", ": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " "),
                (r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", ""), (r"[\'\_,\-\:\-\+]$", ""),
                (r"^\.\S+$", "")]
_SEPARATORS = re.compile(r"[-_]")

# A caption that looks like a URL or a file name is text to clean here, not a page to fetch: bs4's hint about it
# would be printed once per process during extraction. Silenced for this module only.
warnings.filterwarnings("ignore", message=".*looks more like a (URL|filename)", module=__name__)


def _apply(steps: list[tuple[str, str]], text: str) -> str:
    for pattern, replacement in steps:
        text = re.sub(pattern, replacement, text)
    return text


def basic_clean(text: str) -> str:
    """Mojibake fixed (ftfy), HTML entities decoded twice, then stripped (the strip diffusers leaves out)."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_once(caption: str) -> str:
    """One pass of DeepFloyd-IF's clean_caption in PixArt-alpha's order: lower case; URLs, HTML, @names, CJK, IDs,
    file names and punctuation runs removed; dashes and quotes normalised."""
    from bs4 import BeautifulSoup

    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = BeautifulSoup(_apply(_BEFORE_MARKUP, text), features="html.parser").text
    text = _apply(_AFTER_MARKUP, text)
    if len(_SEPARATORS.findall(text)) > 3:  # this-is-my-cute-cat
        text = _SEPARATORS.sub(" ", text)
    return _apply(_AFTER_BASIC, basic_clean(text)).strip()


def clean_caption(text: str) -> str:
    """What PixArt-alpha's T5 extractor encodes for a caption: `clean_once` applied twice."""
    return clean_once(clean_once(text))
