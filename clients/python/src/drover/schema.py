"""Validation against the project's JSON Schema of the job message (contract v1).

The schema file ships inside this package; a test checks it equals
``docs/job-message.schema.json`` so Python and Rust refuse the same messages, naming the
same field.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from .errors import InvalidJob

#: Bodies above this size are refused (the worker's poison limit, ``MAX_BODY_BYTES``).
MAX_BODY_BYTES = 1024 * 1024
#: Longest idempotency key, in UTF-8 bytes (the schema's maxLength counts characters).
MAX_KEY_BYTES = 256


@cache
def schema() -> dict[str, Any]:
    """The contract-v1 JSON Schema shipped with this package."""
    text = resources.files("drover").joinpath("job-message.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema())
    validator: jsonschema.protocols.Validator = cls(schema())
    return validator


def _show(value: object) -> str:
    text = json.dumps(value, default=str)
    if len(text) > 80:
        return f"{text[:80]}… ({len(text)} bytes)"
    return text


def validate_message(message: dict[str, Any]) -> bytes:
    """Checks ``message`` against the schema and the size limits; returns its JSON body.

    Raises :class:`InvalidJob` naming the first offending field and its value.
    """
    key = message.get("idempotency_key")
    shown_key = key if isinstance(key, str) else None
    errors = sorted(_validator().iter_errors(message), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        if err.path:
            field = str(err.path[0])
            reason = _short(err.message)
            if field == "idempotency_key":
                # Do not repeat a bad key as the message's prefix.
                shown_key = None
                if err.validator == "maxLength" and isinstance(key, str):
                    reason = f"{len(key)} characters, at most {MAX_KEY_BYTES} allowed"
        elif err.validator == "required":
            field = str(err.message).split("'")[1] if "'" in err.message else "?"
            reason = "missing"
        elif err.validator == "additionalProperties":
            extra = sorted(set(message) - set(schema()["properties"]))
            field = extra[0] if extra else "?"
            reason = "not part of contract v1"
        else:
            field, reason = "body", _short(err.message)
        raise InvalidJob(shown_key, field, reason)
    assert isinstance(key, str)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidJob(
            None,
            "idempotency_key",
            f"{len(key.encode())} bytes, at most {MAX_KEY_BYTES} allowed ({_show(key)})",
        )
    try:
        body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise InvalidJob(key, "params", f"not JSON-serialisable: {e}") from e
    if len(body) > MAX_BODY_BYTES:
        raise InvalidJob(
            key,
            "params",
            f"the message is {len(body)} bytes, larger than the {MAX_BODY_BYTES}-byte limit",
        )
    return body


def _short(text: str) -> str:
    """Cuts a message that quotes a huge value, saying how long it was."""
    return text if len(text) <= 160 else f"{text[:160]}… ({len(text)} chars)"
