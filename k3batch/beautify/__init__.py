"""Prompt beautification: an LLM expands short prompts before generation (Kandinsky 3.1).

- `prompt`: the exact Kandinsky 3.1 prompt format and its chat template.
- `client`: an OpenAI-compatible chat/completions client with bounded rate and retries,
  usable outside Ray Data (e.g. from a Ray Serve deployment).
- `config`: the `beautify` section of a job config.
- `choose`: which prompt generation uses (beautified, truncated or the original).
- `ray_llm`: the `vllm` backend on Ray Data LLM.

Nothing here imports torch, vllm or ray at module import.
"""
