"""The one rule for numbers in the JSON the toolkit writes: no NaN or Infinity, ever.

Standard JSON has no token for a non-finite number. Python writes `NaN` and
`Infinity` anyway, and a strict reader (jq, JavaScript's JSON.parse, Go,
pandas with a strict engine) refuses the whole file. So:

- Every JSON file and every JSON line the toolkit writes is made by
  `json_text`, which refuses a non-finite float (ValueError): one that gets
  this far is a bug, found when it is written instead of by the next reader.
- A value that may legitimately be non-finite is encoded by its owner, as
  null, and the owner documents what null means there (`finite_or_none`):
  `best_val_loss` before any validation, a validation loss that came out NaN,
  a loss of metrics.jsonl on the step that stopped the run (whose `end` line
  says why), a window entry that was not a number.

Reading stays lenient: Python's json reads the `NaN` / `Infinity` of files
written by earlier versions, and the owners read their older encodings back
(early stopping's and the progress line's "inf" / "nan" strings), so old
checkpoints still resume.
"""

from __future__ import annotations

import json
import math


def json_text(value, *, indent: int | None = None, sort_keys: bool = False, ensure_ascii: bool = True,
              default=None) -> str:
    """`value` as standard JSON text; ValueError for a NaN or an infinity anywhere in it."""
    return json.dumps(value, allow_nan=False, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                      default=default)


def finite_or_none(value):
    """The encoding of a number that may be non-finite: itself when finite, None (null) when not.
    Anything that is not a float is returned as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
