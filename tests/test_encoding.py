"""One encoder for every consumer: answers are the suffix of the joint encoding, on real tokenizers.

The preset families' tokenizers come from files that PyPI packages ship (no hub): Mistral's
SentencePiece models in `mistral-common`, Llama 3's tiktoken ranks in `llama-models` (installed with
--no-deps by `make setup`; the packages are located, never imported). Each family is checked twice:
through the raw library the model was trained with (sentencepiece, tiktoken) behind a minimal
tokenizer interface, and as transformers loads it (LlamaTokenizer from the .model file; Llama 3
through transformers' tiktoken converter), which must agree with the raw library on these texts.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from steersweep.core.errors import EncodingError
from steersweep.inputs import datasets as data
from steersweep.inputs.encoding import Encoded, encode, encode_prompts, model_inputs, position_ids, user_messages
from steersweep.scoring import behavior, metrics

CONT = data.load_jsonl("sentiment_continuations", ("prefix", "positive", "negative"))
AB = data.load_jsonl("sentiment_ab", ("question", "A", "B", "positive"))

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
]  # fmt: skip
LLAMA3_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]
LLAMA3_TEMPLATE = (  # Llama 3 Instruct's template, without tools
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_TEMPLATE = (  # Mistral 7B Instruct v0.1's template
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def shipped(package: str, rel: str) -> Path:
    """A file inside an installed package, found without importing it (its imports need other deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed: run make setup")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        pytest.skip(f"{package} has no {rel}")
    return path


class RawTokenizer:
    """The tokenizer interface `encoding` uses, on top of a raw encode function (no transformers)."""

    def __init__(self, encode_fn, decode_fn, bos: int, bos_text: str, template: str | None = None):
        self.encode_fn, self.decode_fn, self.bos, self.bos_text = encode_fn, decode_fn, bos, bos_text
        self.chat_template = template
        self.pad_token_id, self.eos_token_id = None, None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([self.bos] if add_special_tokens else []) + self.encode_fn(text)}

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        import jinja2

        assert not tokenize
        return jinja2.Template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_text, eos_token=""
        )

    def decode(self, ids) -> str:
        return self.decode_fn([i for i in ids if i != self.bos])


@pytest.fixture(scope="module")
def mistral_sp():
    """Mistral 7B's SentencePiece model, as sentencepiece itself encodes (what mistral-common does)."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(shipped("mistral_common", "data/tokenizer.model.v1")))
    return RawTokenizer(sp.encode, sp.decode, sp.bos_id(), "<s>")


def _hf_sentencepiece(tmp_path_factory, rel: str):
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("spm")
    shutil.copy(shipped("mistral_common", rel), d / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(d), add_bos_token=True)
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def mistral_hf(tmp_path_factory):
    """transformers' LlamaTokenizer converted from Mistral 7B's (v1) SentencePiece model."""
    return _hf_sentencepiece(tmp_path_factory, "data/tokenizer.model.v1")


@pytest.fixture(scope="module")
def mistral_v3_hf(tmp_path_factory):
    """The same from the v3 instruct model (32768 tokens, control tokens)."""
    return _hf_sentencepiece(tmp_path_factory, "data/mistral_instruct_tokenizer_240323.model.v3")


@pytest.fixture(scope="module")
def llama3_tiktoken():
    """Llama 3's ranks as tiktoken encodes them (what llama-models does), with its chat template."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(shipped("llama_models", "llama3/tokenizer.model")))
    special = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIAL)}
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    return RawTokenizer(
        lambda t: enc.encode(t, allowed_special="all"), enc.decode, special["<|begin_of_text|>"],
        "<|begin_of_text|>", LLAMA3_TEMPLATE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llama3_hf():
    """transformers' tokenizer for Llama 3, converted from the tiktoken ranks (BOS added like Meta's)."""
    pytest.importorskip("tiktoken")
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = str(shipped("llama_models", "llama3/tokenizer.model"))
    obj = TikTokenConverter(path, pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL).converted()
    bos = obj.token_to_id("<|begin_of_text|>")
    obj.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]),
    ])  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=obj, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def ids(tok, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def contexts(tok, fmt: str, chat: bool) -> list[tuple[str, bool, list[str]]]:
    """(context text, special tokens added, [matching answer, other answer]) per item, written out."""
    out = []
    for it in CONT if fmt == "continuation" else AB:
        if fmt == "continuation":
            out.append((it["prefix"], True, [it["positive"], it["negative"]]))
            continue
        q = f"{it['question']}\n\n(A) {it['A']}\n(B) {it['B']}\n\nAnswer with A or B."
        letters = [it["positive"], "B" if it["positive"] == "A" else "A"]
        if chat:
            msgs = [{"role": "user", "content": q}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "("
            out.append((text, False, letters))
        else:
            out.append((q + "\nAnswer: (", True, letters))
    return out


def check_suffix(tok, fmt: str, chat: bool) -> list[tuple[Encoded, Encoded]]:
    """The scored ids of every answer are the suffix of the jointly encoded context + answer."""
    enc = behavior.encode_behavior_items(tok, CONT if fmt == "continuation" else AB, fmt, chat)
    for pair, (ctx, special, answers) in zip(enc, contexts(tok, fmt, chat), strict=True):
        for e, answer in zip(pair, answers, strict=True):
            joint = ids(tok, ctx + answer, special)
            assert list(e.ids) == joint
            assert list(e.answer) == joint[e.n_context :] and len(e.answer) >= 1
            assert list(e.context) == ids(tok, ctx, special)[: e.n_context]  # a true prefix of the context's ids
            assert e.n_context >= len(ids(tok, ctx, special)) - 1  # at most the boundary token merged away
            assert tok.decode(e.answer).strip().endswith(answer.strip())  # the answer text is covered
    return enc


FAMILIES = ["mistral_sp", "mistral_hf", "mistral_v3_hf", "llama3_tiktoken", "llama3_hf", "tokenizer"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt,chat", [("continuation", False), ("ab", False), ("ab", True)])
def test_answers_are_the_suffix_of_the_joint_encoding(family, fmt, chat, request):
    tok = request.getfixturevalue(family)
    if chat and not tok.chat_template:
        pytest.skip("no chat template")
    check_suffix(tok, fmt, chat)


@pytest.mark.parametrize("hf,raw", [("mistral_hf", "mistral_sp"), ("llama3_hf", "llama3_tiktoken")])
def test_transformers_loading_agrees_with_the_raw_tokenizer(hf, raw, request):
    """On every joint text scored here, the transformers-loaded tokenizer gives the library's own ids."""
    tok, ref = request.getfixturevalue(hf), request.getfixturevalue(raw)
    for fmt in ("continuation", "ab"):
        for (m, o), (ctx, _, answers) in zip(
            behavior.encode_behavior_items(tok, CONT if fmt == "continuation" else AB, fmt, False),
            contexts(tok, fmt, False),
            strict=True,
        ):
            for e, answer in zip((m, o), answers, strict=True):
                assert list(e.ids) == ids(ref, ctx + answer, True)
    if ref.chat_template:  # sentencepiece cannot read "<s>" in text: the raw Mistral wrapper has none
        chat = [(m.ids, o.ids) for m, o in behavior.encode_behavior_items(tok, AB, "ab", True)]
        assert chat == [(m.ids, o.ids) for m, o in behavior.encode_behavior_items(ref, AB, "ab", True)]


# Quoted in a closing note: the ids scored for the first item of each shipped dataset.
PINNED = {
    # family: (continuation c000: positive, negative), (ab000 raw "Answer: (": matching, other)
    "mistral_sp": (([15992], [15340]), ([28741], [28760])),  # ▁delicious ▁awful | A B
    "llama3_tiktoken": (([18406], [25629]), ([32], [33])),  # Ġdelicious Ġawful | A B
}


@pytest.mark.parametrize("family", sorted(PINNED))
def test_scored_ids_of_the_first_items(family, request):
    tok = request.getfixturevalue(family)
    (cpos, cneg), (apos, aneg) = PINNED[family]
    m, o = behavior.encode_behavior_items(tok, CONT[:1], "continuation", False)[0]
    assert (list(m.answer), list(o.answer)) == (cpos, cneg)
    m, o = behavior.encode_behavior_items(tok, AB[:1], "ab", False)[0]
    assert (list(m.answer), list(o.answer)) == (apos, aneg)


def test_answers_encoded_alone_are_not_what_mistral_reads(mistral_sp):
    """The old way (context and answer encoded apart) scores tokens the model never reads."""
    m, _ = behavior.encode_behavior_items(mistral_sp, CONT[:1], "continuation", False)[0]
    assert ids(mistral_sp, " delicious", False) == [28705, 15992] != list(m.answer)  # ['▁', '▁delicious']
    m, _ = behavior.encode_behavior_items(mistral_sp, AB[:1], "ab", False)[0]
    assert ids(mistral_sp, "A", False) == [330] != list(m.answer)  # ▁A, not A


def test_llama3_chat_merges_the_parenthesis_into_the_answer(llama3_tiktoken):
    """After the assistant header "\\n\\n", "(A" is one pre-token: the merged token is the answer."""
    m, o = behavior.encode_behavior_items(llama3_tiktoken, AB[:1], "ab", True)[0]
    assert llama3_tiktoken.decode(m.answer) == "(A" and llama3_tiktoken.decode(o.answer) == "(B"
    assert m.context == o.context and llama3_tiktoken.decode(m.context[-1:]) == "\n\n"


# ---------------------------------------------------------------------------------------------
# The encoder itself


def test_encode_text_messages_and_prefill(tokenizer):
    text = "Honestly, the food was"
    e = encode(tokenizer, text)
    assert list(e.ids) == tokenizer(text)["input_ids"] and e.answer == ()
    msgs = user_messages("Hi there", "Be brief.")
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    e = encode(tokenizer, msgs, "B", prefill="(")
    assert list(e.ids) == tokenizer(rendered + "(B", add_special_tokens=False)["input_ids"]
    no_gen = encode(tokenizer, msgs, add_generation_prompt=False)
    plain = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert list(no_gen.ids) == tokenizer(plain, add_special_tokens=False)["input_ids"]
    with pytest.raises(EncodingError):
        encode(tokenizer, text, prefill="(")


def test_boundary_merge_goes_to_the_answer(tokenizer):
    """A context ending in a space: the space merges with the answer's first word."""
    e = encode(tokenizer, "The food was ", "great")
    assert list(e.ids) == tokenizer("The food was great")["input_ids"]
    assert tokenizer.decode(e.answer) == " great"
    assert list(e.context) == tokenizer("The food was ")["input_ids"][: e.n_context]


def test_encode_prompts_is_the_generation_encoder(tokenizer):
    from omegaconf import OmegaConf

    from steersweep.core.config import GenerationConfig

    gen = OmegaConf.structured(GenerationConfig(system_prompt="Be kind."))
    got = encode_prompts(tokenizer, ["Describe the sea."], gen)
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Describe the sea."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert got == [tokenizer(text, add_special_tokens=False)["input_ids"]]
    gen.chat_template = "off"
    assert encode_prompts(tokenizer, ["Describe the sea."], gen) == [tokenizer("Describe the sea.")["input_ids"]]


def test_model_inputs_left_pad_with_mask_following_positions():
    got = model_inputs([[5, 6, 7], [8]], None)
    assert got["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert got["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert got["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert position_ids(torch.tensor([[0, 1, 1, 1]])).tolist() == [[0, 0, 1, 2]]


# ---------------------------------------------------------------------------------------------
# Absolute positions: padded forwards equal unpadded ones


def tiny_gpt2(vocab: int = 49152):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=3, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def test_absolute_position_model_scores_the_same_padded_or_not(tokenizer):
    """GPT-2 adds a learned embedding per absolute position: padding must not shift them."""
    from steersweep.vectors.directions import mean_activation

    model = tiny_gpt2()
    prompts = [tokenizer(t)["input_ids"] for t in ("Hi", "The sea is wide and deep today", "A cat")]
    comps = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" there", " and calm", " sat down")]
    batched = metrics.tail_logprobs(
        model, [p + c for p, c in zip(prompts, comps, strict=True)], [len(c) for c in comps], 2
    )
    for p, c, got in zip(prompts, comps, batched, strict=True):
        alone = metrics.tail_logprobs(model, [p + c], [len(c)], 2)[0]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(alone), rtol=1e-5, atol=1e-5)
    ppl = metrics.perplexities(model, prompts, comps, 2)
    for p, c, got in zip(prompts, comps, ppl, strict=True):
        assert got == pytest.approx(metrics.perplexities(model, [p], [c], 2)[0], rel=1e-5)
    texts = ["Hi", "The sea is wide and deep today", "A cat"]
    batched_mean, _ = mean_activation(model, tokenizer, texts, [1], -1, batch_size=3)
    one_by_one = [mean_activation(model, tokenizer, [t], [1], -1)[0][1] for t in texts]
    torch.testing.assert_close(batched_mean[1], torch.stack(one_by_one).mean(0), rtol=1e-4, atol=1e-5)


def test_behavior_prob_is_stable_for_huge_log_odds():
    assert behavior.sigmoid(1e6) == 1.0 and behavior.sigmoid(-1e6) == 0.0 and behavior.sigmoid(0.0) == 0.5
    assert behavior.sigmoid(-800.0) == pytest.approx(0.0, abs=1e-300)
