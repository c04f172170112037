"""Row shapes: the ones people already have, brought to the three that hpd trains on.

Detected per row, so one file may mix them:

    {"messages": [{"role", "content"}, ...]}                       as it is
    {"conversations": [{"from": "human"|"gpt"|"system", "value"}]} ShareGPT -> messages
    {"instruction", "input" (optional), "output"}                  Alpaca   -> messages
    {"prompt", "completion"} / {"text"}                            as they are

Other column names are mapped onto these with `--data-columns messages=dialog`
(the name hpd expects = the column in the data).
"""

from __future__ import annotations

from typing import Any

# every name a row may carry, after mapping
FIELDS = ("messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion",
          "text")

# ShareGPT speakers; "user"/"assistant" appear in many ShareGPT-style exports as well
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "system": "system"}

SHAPES = ('expected a "messages", "prompt"/"completion" or "text" field, ShareGPT "conversations" or '
          'Alpaca "instruction"/"output"')


def parse_columns(spec: Any) -> dict[str, str]:
    """{hpd name: data column} from a dict, or from `NAME=COLUMN` strings (one per flag, or comma-separated)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        items = [spec] if isinstance(spec, str) else list(spec)
        pairs = []
        for item in (part for entry in items for part in str(entry).split(",") if part.strip()):
            name, sep, column = item.partition("=")
            if not sep or not name.strip() or not column.strip():
                raise ValueError(f"data_columns: {item!r} is not NAME=COLUMN (e.g. messages=dialog)")
            pairs.append((name, column))
    out = {}
    for name, column in pairs:
        name, column = str(name).strip(), str(column).strip()
        if name not in FIELDS:
            raise ValueError(f"data_columns: unknown field {name!r}; allowed: {', '.join(FIELDS)}")
        out[name] = column
    return out


def normalize(row: dict, columns: dict[str, str] | None = None) -> dict:
    """The row in one of hpd's own shapes; ValueError says what is wrong with it."""
    if columns:
        row = dict(row)
        for name, column in columns.items():
            if column in row and column != name:
                row[name] = row.pop(column)
    if "messages" in row:
        return row
    # the row's other fields (a teacher column, say) stay with it, as in hpd's own shapes
    if "conversations" in row:
        rest = {k: v for k, v in row.items() if k not in ("conversations", "system")}
        return {**rest, "messages": sharegpt_messages(row["conversations"], row.get("system"))}
    if "instruction" in row:
        rest = {k: v for k, v in row.items() if k not in ("instruction", "input", "output", "system")}
        return {**rest, "messages": alpaca_messages(row)}
    if "prompt" in row or "completion" in row or "text" in row:
        return row
    hint = "; map other column names with --data-columns NAME=COLUMN" if not columns else ""
    raise ValueError(f"{SHAPES}; got keys {sorted(row)}{hint}")


def sharegpt_messages(turns, system=None) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError('"conversations" must be a non-empty list')
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{i}] must be an object")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(speaker, str) or not isinstance(text, str):
            raise ValueError(f'conversations[{i}] must have string "from" and "value"')
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise ValueError(f"conversations[{i}]: unknown speaker {speaker!r}; allowed: "
                             f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": text})
    return messages


def alpaca_messages(row: dict) -> list[dict]:
    """The instruction (and its input, after a blank line) as the user turn, the output as the reply."""
    instruction, extra, output = row.get("instruction"), row.get("input", ""), row.get("output")
    for key, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str) or not value:
            raise ValueError(f'Alpaca row: "{key}" must be a non-empty string')
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise ValueError('Alpaca row: "input" must be a string')
    system = row.get("system")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
