"""Model config files: find and read a config.json safely, and check the fields memplan reads.

A config.json comes from anywhere (a download, a colleague, a typo), so nothing in it is trusted:
the file must be a regular UTF-8 file of sane size, and every field memplan reads must have the
type and range a real model can have. Every refusal is one line naming the file and the key.
Unknown extra fields are fine (configs carry many); `null` on an optional field means absent.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from memplan.errors import MemplanError

MAX_FILE_BYTES = 64 << 20  # a config.json is a few KiB; the largest seen are under 1 MiB
MAX_INT_DIGITS = 100  # beyond any count a config holds; Python refuses more than 4300 digits anyway
MAX_LAYERS = 10_000  # the deepest real models have a few hundred layers
MAX_WIDTH = 1 << 20  # 1048576; the widest real models are under 64Ki (hidden, ffn, heads)
MAX_VOCAB = 1 << 24  # 16777216; the largest real vocabularies are about 256Ki
MAX_POSITIONS = 1 << 27  # 134217728; the longest real contexts are about 10Mi tokens

# Counts and widths memplan reads, across families (aliases on one line): (smallest, largest, what).
INT_FIELDS: dict[str, tuple[int, int, str]] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model"), (1, MAX_WIDTH, "a width")),
    **dict.fromkeys(("num_attention_heads", "n_head"), (1, MAX_WIDTH, "a head count")),
    "num_key_value_heads": (1, MAX_WIDTH, "a head count"),
    "head_dim": (1, MAX_WIDTH, "a width"),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner"), (1, MAX_WIDTH, "a width")),
    **dict.fromkeys(("num_hidden_layers", "n_layer"), (1, MAX_LAYERS, "a layer count")),
    "vocab_size": (1, MAX_VOCAB, "a vocabulary size"),
    **dict.fromkeys(("max_position_embeddings", "n_positions"), (1, MAX_POSITIONS, "a number of positions")),
    "word_embed_proj_dim": (1, MAX_WIDTH, "a width"),
    "type_vocab_size": (0, MAX_WIDTH, "a vocabulary size"),
}
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "enable_bias", "do_layer_norm_before",
               "layer_norm_elementwise_affine", "_remove_final_layer_norm",
               "norm_topk_prob")  # MoE routers: renormalise the top-k weights (a flag, not a dropout)
STR_FIELDS = ("model_type", "hidden_act", "activation_function")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_HEADS = ("num_attention_heads", "n_head")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _text(s: str, limit: int = 60) -> str:
    """`s` on one printable line, cut to `limit` characters (names and values in messages)."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _show(value) -> str:
    if isinstance(value, _HugeInt):
        return f"an integer of {len(value.lstrip('-'))} digits"
    return _text(repr(value))


NOT_DROPOUT = ("norm_topk_prob",)  # MoE configs: a switch (renormalise the top-k router weights), not a probability


def _is_dropout(key: str) -> bool:
    k = key.lower()
    return ("dropout" in k or k.endswith("_pdrop") or k.endswith("_prob")) and k not in NOT_DROPOUT


class _HugeInt(str):
    """A JSON integer too long to convert: kept as its digits so the message can name its key."""


def _parse_int(digits: str):
    return _HugeInt(digits) if len(digits.lstrip("-")) > MAX_INT_DIGITS else int(digits)


def _find_huge(obj, path: str = "") -> tuple[str, _HugeInt] | None:
    """The first over-long integer in a parsed document and its key path (iterative: no recursion)."""
    stack = [(path, obj)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, _HugeInt):
            return where, item
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else k, v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


def config_path(model: str) -> Path | None:
    """The config.json that `model` names as a local path, or None when no such path exists.

    Refuses an empty name, a folder without config.json, a device / FIFO / socket, and a path that
    cannot be looked at (too long, unknown ~user, no permission).
    """
    if not model.strip():
        raise MemplanError("the model name is empty; give a catalog id or alias (`memplan models` lists them), "
                           "a config.json, or a folder holding one")
    name = _text(model, 200)
    try:
        path = Path(model).expanduser()
        if path.is_dir():
            path = path / "config.json"
            if not path.exists():
                raise MemplanError(f"{name}: folder holds no config.json")
        if not path.exists():
            return None
        mode = path.stat().st_mode
    except RuntimeError as e:  # ~user that does not exist
        raise MemplanError(f"{name}: {e}") from None
    except OSError as e:
        raise MemplanError(f"{name}: cannot read ({e.strerror or e})") from None
    except ValueError:  # an embedded NUL
        raise MemplanError(f"{name}: not a valid path") from None
    if not stat.S_ISREG(mode):
        raise MemplanError(f"{_text(str(path), 200)}: not a regular file ({_kind(mode)}); "
                           "give a config.json or a folder holding one")
    return path


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def read_config(path: str | Path) -> dict:
    """The JSON object in a config file, or a one-line MemplanError that names the file and what is wrong."""
    name = _text(str(path), 200)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)  # a FIFO must not block
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise MemplanError(f"{name}: cannot read ({e.strerror or e})") from None
    except ValueError:
        raise MemplanError(f"{name}: not a valid path") from None
    with os.fdopen(fd, "rb") as f:
        mode, size = os.fstat(fd).st_mode, os.fstat(fd).st_size
        if not stat.S_ISREG(mode):
            raise MemplanError(f"{name}: not a regular file ({_kind(mode)}); give a config.json or a folder holding one")
        too_big = (f"{name}: larger than {MAX_FILE_BYTES >> 20} MiB, the most memplan reads "
                   "(a config.json is a few KiB)")
        if size > MAX_FILE_BYTES:
            raise MemplanError(too_big)
        try:
            data = f.read(MAX_FILE_BYTES + 1)  # /proc files say size 0; read no more than the cap
        except OSError as e:
            raise MemplanError(f"{name}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise MemplanError(too_big)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MemplanError(f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                           "a config.json is UTF-8 JSON") from None
    try:
        cfg = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise MemplanError(f"{name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise MemplanError(f"{name}: JSON nested too deeply to read (a config.json nests a few levels)") from None
    huge = _find_huge(cfg)
    if huge is not None:
        key, value = huge
        raise MemplanError(f"{name}: {f'key {_text(key)!r}' if key else 'the document'} is {_show(value)}; "
                           f"memplan reads integers of at most {MAX_INT_DIGITS} digits")
    if not isinstance(cfg, dict):
        raise MemplanError(f"{name}: expected a JSON object of config fields, got {_JSON_TYPES.get(type(cfg), 'a value')}")
    return cfg


def _reads(key) -> bool:
    """Whether memplan reads `key` (a field this module checks)."""
    return isinstance(key, str) and (key in INT_FIELDS or key in BOOL_FIELDS or key in STR_FIELDS or _is_dropout(key))


def without_nulls(cfg: dict) -> dict:
    """`cfg` without the `null`s of the fields memplan reads: null means absent, so the default applies.

    transformers does the same for the shape fields (head_dim, num_key_value_heads, n_inner,
    word_embed_proj_dim); other nulls (sliding_window, rope_scaling) keep their meaning and stay.
    """
    if not any(v is None and _reads(k) for k, v in cfg.items()):
        return cfg
    return {k: v for k, v in cfg.items() if v is not None or not _reads(k)}


def check_config(cfg: dict, where: str) -> None:
    """Check every field memplan reads that `cfg` holds: types, ranges, and shapes that can exist.

    Which fields a family needs is the spec's business; this refuses values no real model has.
    """
    where = _text(where, 200)
    for key, value in cfg.items():
        if not isinstance(key, str) or value is None:
            continue
        if key in INT_FIELDS:
            lo, hi, what = INT_FIELDS[key]
            if isinstance(value, bool) or not isinstance(value, int):
                kind = "a non-negative" if lo == 0 else "a positive"
                raise MemplanError(f"{where}: {key!r} must be {kind} integer, got {_show(value)}")
            if value < lo:
                kind = "a non-negative" if lo == 0 else "a positive"
                raise MemplanError(f"{where}: {key!r} must be {kind} integer, got {value}")
            if value > hi:
                raise MemplanError(f"{where}: {key!r} is {value}; memplan reads {what} of at most {hi}, "
                                   "far above any real model")
        elif key in BOOL_FIELDS:
            if not isinstance(value, bool):
                raise MemplanError(f"{where}: {key!r} must be true or false (a JSON boolean), got {_show(value)}")
        elif key in STR_FIELDS:
            if not isinstance(value, str):
                raise MemplanError(f"{where}: {key!r} must be a string, got {_show(value)}")
        elif _is_dropout(key):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise MemplanError(f"{where}: {_text(repr(key))} is a dropout probability: a number in [0, 1), "
                                   f"got {_show(value)}")
    hidden_key = next((k for k in _HIDDEN if cfg.get(k) is not None), None)
    heads_key = next((k for k in _HEADS if cfg.get(k) is not None), None)
    if hidden_key and heads_key:
        hidden, heads = cfg[hidden_key], cfg[heads_key]
        if heads > hidden:
            raise MemplanError(f"{where}: {heads_key!r} ({heads}) exceeds {hidden_key!r} ({hidden}); "
                               "a model has at most one head per dimension")
        if cfg.get("head_dim") is None and hidden % heads:
            raise MemplanError(f"{where}: {hidden_key!r} ({hidden}) is not a multiple of {heads_key!r} ({heads}), "
                               "and there is no head_dim; give heads that divide it or an explicit head_dim")
