"""Keep torch out of tokenizer and detokenizer processes.

transformers imports torch whenever it is installed (its config classes pull in rope helpers),
although tokenizing needs only the `tokenizers` library: torch would add about 1.5 s to every
start and a few hundred MB to every such process. Marking torch absent in `sys.modules` before
transformers is first imported makes transformers run in its tokenizers-only mode.
"""

from __future__ import annotations

import os
import sys


def hide_torch_from_transformers() -> bool:
    """Mark torch as not installed for this process; True if it took effect.

    Only a process that has imported neither torch nor transformers can be switched (a test
    process that already holds torch keeps it), so this is called first thing by the tokenizer
    and detokenizer stage commands, never on import.
    """
    if "torch" in sys.modules or "transformers" in sys.modules:
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]  # importlib treats None as "not found"
    # transformers says once per process that models are unavailable: expected here, not news.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return True
