"""A Gradio web demo of ALBEF: `python -m demo` (see demo/cli.py for the flags, demo/app.py for the tabs)."""
