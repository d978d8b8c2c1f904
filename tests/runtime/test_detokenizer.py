"""Streamed text against the tokenizer's own decode of all the ids, on real tokenizers: SmolLM2's
byte-level BPE and a SentencePiece-style one (metaspace, byte fallback, leading-space strip)."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kiln.runtime.detokenizer import IncrementalDetokenizer, StopChecker

TEXT = "Héllo 世界! Ünïcödé 🎉🙂 naïve café  two  spaces, 東京タワー and 👩‍👩‍👧 fin."


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from kiln.frontends import resolve
    from kiln.frontends.hf import tokenizer_for

    return tokenizer_for(resolve("smollm2"))


def sentencepiece_style_tokenizer():
    """A Llama-style tokenizer built in place: '▁' for spaces, <0xNN> byte tokens for what the
    vocabulary lacks (so every CJK character and emoji spans several tokens), and a decoder
    that strips the space the first token starts with."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁" + string.ascii_letters + string.digits + ".,!?'":
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ["▁Hello", "▁world", "▁the", "▁café", "▁and", "ing", "▁two", "▁spaces", "llo"]:
        piece = word[0]
        for ch in word[1:]:
            vocab.setdefault(ch, len(vocab))
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def tokenizer(request):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer")
    return sentencepiece_style_tokenizer()


def decode(tokenizer, ids, skip_special_tokens=True):
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [detok.add(t) for t in output_ids] + [detok.flush()]
    assert "".join(deltas) == detok.text
    return deltas


def expected_text(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    """What the output adds to the prompt's text; a prompt that ends inside a character (at most
    its last 3 tokens) counts only up to its last whole one."""
    def unfinished(end):
        return decode(tokenizer, prompt_ids[:end], skip_special_tokens).endswith("\ufffd")

    end = len(prompt_ids)
    while end > max(len(prompt_ids) - 3, 0) and unfinished(end):
        end -= 1
    prompt = decode(tokenizer, prompt_ids[:end], skip_special_tokens)
    full = decode(tokenizer, list(prompt_ids) + list(output_ids), skip_special_tokens)
    assert full.startswith(prompt)
    return full[len(prompt):]


def test_characters_split_across_tokens_are_never_streamed_half(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert decode(tokenizer, ids) == TEXT
    assert any("\ufffd" in decode(tokenizer, [t]) for t in ids), "the text should split some character"
    deltas = stream(tokenizer, [], ids)
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") > 3  # held while characters were incomplete
    for cut in (1, 5, 9, len(ids) // 2):  # with a prompt in front: its text is context, not output
        assert "".join(stream(tokenizer, ids[:cut], ids[cut:])) == expected_text(tokenizer, ids[:cut], ids[cut:])


def test_leading_space_of_the_first_output_token_survives():
    tokenizer = sentencepiece_style_tokenizer()
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    output = tokenizer.encode("Hello world and café", add_special_tokens=False)[1:]
    assert tokenizer.convert_ids_to_tokens(output[0]) == "▁world"
    assert decode(tokenizer, output[:1]) == "world"  # decoded alone, the space is stripped
    assert stream(tokenizer, prompt, output)[0] == " world"
    assert "".join(stream(tokenizer, prompt, output)) == " world and café"


def test_special_tokens(tokenizer):
    ids = tokenizer.encode("Hello world", add_special_tokens=False) + [tokenizer.eos_token_id]
    ids += tokenizer.encode(" and 世界", add_special_tokens=False)
    for skip in (True, False):
        text = "".join(stream(tokenizer, [], ids, skip))
        assert text == expected_text(tokenizer, [], ids, skip)
        assert (tokenizer.eos_token in text) != skip


alphabet = st.sampled_from(list("ab zé世界東京🎉👩‍🙂Ü.,!? \n") + ["the ", "Hello ", "café ", "  "])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(alphabet, min_size=1, max_size=25).map("".join), st.integers(0, 30))
def test_streamed_text_equals_decode_of_all_ids(tokenizer, text, cut):
    ids = tokenizer.encode(text, add_special_tokens=False)
    cut = min(cut, len(ids))
    deltas = stream(tokenizer, ids[:cut], ids[cut:])
    assert "".join(deltas) == expected_text(tokenizer, ids[:cut], ids[cut:])
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 300), min_size=1, max_size=30), st.integers(0, 10))
def test_arbitrary_ids_including_invalid_utf8(smollm2_tokenizer, ids, cut):
    # byte-level only: a byte-fallback decoder turns a whole run of byte tokens into U+FFFD when
    # any of it is invalid, so a valid byte streamed before an invalid one decodes differently alone
    tokenizer = smollm2_tokenizer
    cut = min(cut, len(ids))
    assert "".join(stream(tokenizer, ids[:cut], ids[cut:])) == expected_text(tokenizer, ids[:cut], ids[cut:])


# --- stop strings -----------------------------------------------------------------------------

def feed_all(checker, deltas):
    out = [checker.feed(d) for d in deltas]
    return out + [checker.flush()]


def test_stop_string_across_deltas_is_cut_and_never_streamed():
    checker = StopChecker(["STOP"])
    out = feed_all(checker, ["Hello S", "T", "OP and more", " after"])
    assert out == ["Hello ", "", "", "", ""]
    assert checker.stopped == "STOP" and checker.output_text == "Hello "


def test_check_takes_the_whole_text_so_far():
    checker = StopChecker(["\n\n", "User:"])
    assert checker.check("Paris is") is None
    assert checker.check("Paris is the capital.\nUs") is None
    assert checker.check("Paris is the capital.\nUser: and") == ("Paris is the capital.\n", "User:")
    assert checker.check("Paris is the capital.\nUser: and more") == ("Paris is the capital.\n", "User:")


def test_include_stop_string_in_output():
    checker = StopChecker(["STOP"], include_stop_str_in_output=True)
    out = feed_all(checker, ["Hello S", "T", "OP and more"])
    assert "".join(out) == checker.output_text == "Hello STOP"


def test_held_prefix_is_released_when_it_does_not_become_a_stop():
    checker = StopChecker(["</end>", "##"])
    out = feed_all(checker, ["a </e", "nd", "x #", "b"])
    assert out == ["a ", "", "</endx ", "#b", ""]
    assert checker.stopped is None and checker.output_text == "a </endx #b"
    tail = StopChecker(["</end>"])
    assert feed_all(tail, ["done </"]) == ["done ", "</"]  # released by flush at the end


def test_first_completed_stop_wins():
    checker = StopChecker(["bcd", "abcdef", "c"])
    assert feed_all(checker, ["xabcdefg"]) == ["xab", ""]
    assert checker.stopped == "c"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text("abc", max_size=4), max_size=12), st.lists(st.text("abc", min_size=1, max_size=3),
       min_size=1, max_size=3), st.booleans())
def test_stop_strings_on_random_splits(deltas, stops, include):
    checker = StopChecker(stops, include)
    streamed = "".join(feed_all(checker, deltas))
    text = "".join(deltas)
    # the reference: feed one character at a time, stop at the first position where a stop string ends
    ends = [(text.find(s) + len(s), -len(s), text.find(s), s) for s in stops if s in text]
    if ends:
        end, _, begin, stop = min(ends)
        expected = text[:end] if include else text[:begin]
        assert checker.stopped == stop
    else:
        expected = text
        assert checker.stopped is None
    assert streamed == checker.output_text == expected
