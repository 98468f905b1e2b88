"""k3batch: Kandinsky 3 batch image generation on Ray.

Importing the package stays light (no torch, diffusers, ray or vllm): those load lazily in
the modules that need them.
"""

__version__ = "0.1.0"
