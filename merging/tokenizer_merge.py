"""Tokenizer merges (mergekit's ``tokenizer_source`` / ``tokenizer:``): an output vocabulary,
and every model's embedding and LM-head rows aligned to it before merging.

Source: mergekit 0.1.5 (``tokenizer/build.py``, ``tokenizer/embed.py``); this is our code.

Output vocabulary V (``build_vocabulary``):
    base           the base model's tokenizer (the first model's without a base)
    union          the base's, plus every other model's tokens it lacks (ordinary tokens first,
                   then added tokens with their settings), model by model in config order
    <model>        that model's tokenizer (``model:<ref>`` is accepted too)
then every ``tokens:`` key not yet in V is added. Each model m gets a permutation
p_m(v) = its row of token v, or -1 when it lacks v (or its row is past its config's vocab_size).

Row alignment (``align_rows``), per vocabulary tensor (rows = tokens) of models M:
    row_m(v) = W_m[p_m(v)]                  when p_m(v) >= 0 and v is not forced
             = d(v)                          otherwise, where the default d(v) is
               the ``tokens:`` override's source (a model's row, a model's named token, zero),
               else the row of the single model that has v, else the base's row when the
               base has v, else the mean of the rows of the models that have v (zero if none).
Rows past |V| (``pad_to_multiple_of``) are the mean of the first |V| rows.
The output config's vocab_size is the padded |V|.

``chat_template``: ``auto`` (the template most of the models share), a named template as
mergekit ships them (``CHAT_TEMPLATES``), or an inline Jinja string.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.config import MergeConfig, ModelToken, TokenOverride, ZeroToken, check_chat_template
from merging.errors import CheckpointMismatchError, MergeConfigError
from merging.io.files import model_file, read_json_object
from merging.io.sources import resolve_folder

__all__ = ["VOCAB_TENSOR", "Vocabulary", "CHAT_TEMPLATES", "needs_vocabulary", "build_vocabulary", "align_rows",
           "chat_template_text", "write_tokenizer"]

log = logging.getLogger(__name__)

VOCAB_TENSOR = re.compile(r"(?:^|.*\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out)\.weight$")
"""Tensors whose rows are tokens (axis 0): aligned to the output vocabulary."""



@dataclass(frozen=True)
class Vocabulary:
    """The output tokenizer and how every model's rows map onto it."""

    tokenizer_json: str  # the output tokenizer.json
    vocab: Mapping[str, int]  # token -> output row
    rows: int  # |V| rounded up to pad_to_multiple_of
    permutations: Mapping[str, tuple[int, ...]]  # model -> its row of each output row's token, -1 if absent
    originals: Mapping[str, Mapping[str, int]]  # model -> its own vocabulary
    donor: Path  # folder whose tokenizer_config.json / special_tokens_map.json the output keeps


def needs_vocabulary(config: MergeConfig) -> bool:
    """Whether the merge builds a vocabulary: ``union``, a merged model's tokenizer, or token
    overrides / padding. ``base`` or a tokenizer folder outside the merge is copied as it is
    (the context also aligns rows for ``base`` when the models' vocabularies differ)."""
    source = config.tokenizer_source
    if source is None:
        return False
    merged = {m.model for m in config.models} | {config.base_model}
    return source == "union" or source in merged or bool(config.tokens) or config.pad_to_multiple_of is not None


def _load(folder: Path, ref: str, required: bool):
    from tokenizers import Tokenizer

    path = model_file(folder, "tokenizer.json", f"model {ref!r}", required=False)
    if path is None:
        if required:
            raise MergeConfigError(f"tokenizer_source: model {ref!r} has no tokenizer.json; a tokenizer merge needs "
                                   "fast (tokenizer.json) tokenizers")
        return None
    return Tokenizer.from_file(str(path))


def _vocab_size(folder: Path, ref: str, fallback: int) -> int:
    config = model_file(folder, "config.json", f"model {ref!r}", required=False)
    size = read_json_object(config, f"model {ref!r}").get("vocab_size") if config is not None else None
    return size if isinstance(size, int) else fallback


def build_vocabulary(source: str, base_ref: str, refs: list[str], folders: Mapping[str, Path],
                     add_tokens: list[str], pad_to_multiple_of: int | None) -> Vocabulary:
    """The output vocabulary of ``tokenizer_source: source`` over models ``refs`` (the base
    first), and each model's permutation onto it."""
    from tokenizers import AddedToken

    base = _load(folders[base_ref], base_ref, required=True)
    tokenizers = {base_ref: base}
    for ref in refs:
        if ref not in tokenizers:
            found = _load(folders[ref], ref, required=False)
            if found is None:
                log.warning("model %r has no tokenizer.json; assuming the base's vocabulary", ref)
            tokenizers[ref] = found or base
    sizes = {ref: _vocab_size(folders[ref], ref, tok.get_vocab_size(with_added_tokens=True))
             for ref, tok in tokenizers.items()}
    donor = folders[base_ref]
    if source == "union":
        out = _union(base, tokenizers, sizes)
    elif source == "base":
        out = type(base).from_str(base.to_str())
    else:
        donor = folders[source] if source in folders else resolve_folder(source)
        out = _load(donor, source, required=True)
    have = out.get_vocab(with_added_tokens=True)
    for token in add_tokens:
        if token not in have:
            out.add_tokens([AddedToken(token, normalized=False)])
            have = out.get_vocab(with_added_tokens=True)
    vocab = dict(sorted(out.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))
    if list(vocab.values()) != list(range(len(vocab))):
        raise CheckpointMismatchError(f"the output tokenizer's ids are not 0..{len(vocab) - 1}; the tokenizer of "
                                      f"{source!r} has gaps")
    rows = len(vocab)
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of
    permutations = {}
    for ref in refs:
        own = tokenizers[ref].get_vocab(with_added_tokens=True)
        permutations[ref] = tuple(own[t] if t in own and own[t] < sizes[ref] else -1 for t in vocab)
    return Vocabulary(out.to_str(), vocab, rows, permutations,
                      {ref: tok.get_vocab(with_added_tokens=True) for ref, tok in tokenizers.items()}, donor)


def _union(base, tokenizers: Mapping, sizes: Mapping[str, int]):
    """The base's tokenizer plus the tokens of the others it lacks (ordinary, then added)."""
    plain: dict[str, None] = {}
    added = {}
    for ref, tok in tokenizers.items():
        decoder = tok.get_added_tokens_decoder()
        contents = {a.content for a in decoder.values()}
        for token, index in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
            if index < sizes[ref] and token not in contents:
                plain.setdefault(token, None)
        for index, info in sorted(decoder.items()):
            if index < sizes[ref]:
                added.setdefault(info.content, info)
    out = type(base).from_str(base.to_str())
    have = base.get_vocab(with_added_tokens=True)
    new_plain = [t for t in plain if t not in added and t not in have]
    if new_plain:
        out.add_tokens(new_plain)
    for info in added.values():
        if info.content not in out.get_vocab(with_added_tokens=True):
            (out.add_special_tokens if info.special else out.add_tokens)([info])
    return out


def align_rows(tensors: Mapping[str, torch.Tensor], vocab: Vocabulary, tokens: Mapping[str, TokenOverride],
               base_ref: str | None) -> dict[str, torch.Tensor]:
    """Every model's token rows (axis 0) in the output vocabulary's order: (rows, *rest) each
    (see the module docstring for the defaults of missing tokens)."""
    models = list(tensors)
    perm = vocab.permutations
    dtype = tensors[models[0]].dtype
    for tensor in tensors.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    shape = tuple(tensors[models[0]].shape[1:])
    if any(tuple(t.shape[1:]) != shape for t in tensors.values()):
        raise CheckpointMismatchError(f"token tensors of {models} differ beyond the vocabulary axis: "
                                      f"{[tuple(t.shape) for t in tensors.values()]}")
    configs: dict[str, TokenOverride] = dict(tokens)
    average = set()
    for token, index in vocab.vocab.items():
        if token in configs:
            continue
        present = [m for m in models if perm[m][index] >= 0]
        if len(present) == 1:
            configs[token] = TokenOverride(source=present[0])
        elif not present:
            configs[token] = TokenOverride(source=ZeroToken(kind="zero"))
            log.warning("token %r is in no model's vocabulary; its row is zero", token)
        elif base_ref in models and perm[base_ref][index] >= 0:
            configs[token] = TokenOverride(source=base_ref)
        else:
            average.add(token)
    defaults = {}
    for token, index in vocab.vocab.items():
        cfg = configs.get(token)
        forced = cfg is not None and cfg.force
        if not forced and all(perm[m][index] >= 0 for m in models):
            continue
        if token in average:
            rows = [tensors[m][perm[m][index]].to(dtype) for m in models if perm[m][index] >= 0]
            defaults[token] = sum(rows[1:], rows[0].clone()) / len(rows)
        elif cfg is not None:
            defaults[token] = _default_row(token, cfg, tensors, vocab, index, shape, dtype)
    out = {}
    size = len(vocab.vocab)
    for m in models:
        rows = torch.zeros((vocab.rows, *shape), dtype=dtype, device=tensors[m].device)
        p = perm[m]
        for token, index in vocab.vocab.items():
            cfg = configs.get(token)
            if p[index] >= 0 and not (cfg is not None and cfg.force):
                rows[index] = tensors[m][p[index]]
            elif token in defaults:
                rows[index] = defaults[token]
        if vocab.rows > size:  # padding rows: the mean of the real ones
            rows[size:] = rows[:size].mean(dim=0)
        out[m] = rows
    return out


def _default_row(token: str, cfg: TokenOverride, tensors: Mapping[str, torch.Tensor], vocab: Vocabulary, index: int,
                 shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    source = cfg.source
    if isinstance(source, ZeroToken) or source is None:
        return torch.zeros(shape, dtype=dtype)
    model = source.model if isinstance(source, ModelToken) else source
    if model not in tensors:
        raise MergeConfigError(f"tokens.{token}.source: model {model!r} is not one of this tensor's models "
                               f"({', '.join(tensors)})")
    if isinstance(source, ModelToken):
        row = source.token_id
        if row is None:
            if source.token not in vocab.originals[model]:
                raise MergeConfigError(f"tokens.{token}.source: token {source.token!r} is not in model {model!r}")
            row = vocab.originals[model][source.token]
        if not 0 <= row < tensors[model].shape[0]:
            raise MergeConfigError(f"tokens.{token}.source: token_id {row} is out of range for model {model!r}")
        return tensors[model][row].to(dtype)
    row = vocab.permutations[model][index]
    if row < 0:
        raise MergeConfigError(f"tokens.{token}.source: model {model!r} does not have token {token!r}")
    return tensors[model][row].to(dtype)


def _template_of(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, dict):
            template = template.get("default")
        return template if isinstance(template, str) else None
    return None


def chat_template_text(value: str | None, folders: list[Path]) -> str | None:
    """The chat template the output gets (None: keep the tokenizer donor's)."""
    if value is None:
        return None
    if value == "auto":
        found = [t.strip() for t in (_template_of(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return CHAT_TEMPLATES.get(check_chat_template(value), value)


def write_tokenizer(out: Path, donor: Path, tokenizer_json: str | None, chat_template: str | None) -> None:
    """The output tokenizer: ``tokenizer_json`` (else the donor's tokenizer files) with the
    donor's config and special-token map; ``chat_template`` replaces the donor's template."""
    from merging.digests import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        source = donor / name
        if source.is_file() and not (tokenizer_json is not None and name in _REBUILT):
            if chat_template is not None and name in ("chat_template.jinja", "chat_template.json"):
                continue
            data = source.read_bytes()
            if name == "tokenizer_config.json" and chat_template is not None:
                config = json.loads(data)
                config.pop("chat_template", None)
                data = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
            (out / name).write_bytes(data)
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json)
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template)


_REBUILT = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt",
            "spiece.model")
"""Donor files the rebuilt tokenizer.json replaces."""


CHAT_TEMPLATES: dict[str, str] = {
    'alpaca': (
        "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if (messages|selectattr('role', 'equalto', 'system')|list) else '' }}\n"
        '\n'
        '{% for message in messages %}\n'
        "{% if message['role'] == 'user' %}\n"
        '### Instruction:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        "{% elif message['role'] == 'assistant' %}\n"
        '### Response:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        "{% elif message['role'] == 'user_context' %}\n"
        '### Input:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        '{% endif %}\n'
        '{% endfor %}\n'
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n"
        '### Response:\n'
        '{% endif %}\n'
    ),
    'chatml': (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
    ),
    'exaone': (
        '{% for message in messages %}\n'
        "    {% if loop.first and message['role'] != 'system' %}\n"
        "        {{ '[|system|][|endofturn|]\\n' }}\n"
        '    {% endif %}\n'
        "    {{ '[|' + message['role'] + '|]' + message['content'] }}\n"
        "    {% if message['role'] == 'user' %}\n"
        "        {{ '\\n' }}\n"
        '    {% else %}\n'
        "        {{ '[|endofturn|]\\n' }}\n"
        '    {% endif %}\n'
        '{% endfor %}\n'
        '{% if add_generation_prompt %}\n'
        "    {{ '[|assistant|]' }}\n"
        '{% endif %}\n'
    ),
    'llama3': (
        '{% set loop_messages = messages %}\n'
        '{% for message in loop_messages %}\n'
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}\n"
        '{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n'
        '{{ content }}\n'
        '{% endfor %}\n'
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n"
    ),
    'mistral': (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content'] %}\n"
        '    {%- set loop_messages = messages[1:] %}\n'
        '{%- else %}\n'
        '    {%- set loop_messages = messages %}\n'
        '{%- endif %}\n'
        '\n'
        '{{- bos_token }}\n'
        '{%- for message in loop_messages %}\n'
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
        '    {%- endif %}\n'
        "    {%- if message['role'] == 'user' %}\n"
        '        {%- if loop.first and system_message is defined %}\n'
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
        '        {%- else %}\n'
        "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        '        {%- endif %}\n'
        "    {%- elif message['role'] == 'assistant' %}\n"
        "        {{- ' ' + message['content'] + eos_token}}\n"
        '    {%- else %}\n'
        "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
        '    {%- endif %}\n'
        '{%- endfor %}\n'
    ),
}
