"""Chat templates shared by every stage, by inference and by serving: the public entry.

The code lives in medgpt/chat_template.py (so ``medgpt`` imports from anywhere); this file keeps the
layout's ``template.py`` and lists the registered names: ``python template.py``.
"""

from medgpt.chat_template import *  # noqa: F401,F403
from medgpt.chat_template import JINJA_TEMPLATES, TEMPLATES

if __name__ == "__main__":
    print("Registered templates:", ", ".join(sorted([*TEMPLATES, *JINJA_TEMPLATES])))
    print("Leave --template_name unset to use the tokenizer's own chat template.")
