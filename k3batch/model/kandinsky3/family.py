"""The Kandinsky 3.1 family as k3batch sees it: members base, Flash and inpainting on a shared
T5 and MoVQ, sampled as `ai-forever/Kandinsky-3`; the base member takes a ControlNet, an
IP-Adapter and LoRAs. Registered in `k3batch.model.family`."""

from __future__ import annotations

import os

from k3batch.model.kandinsky3 import layout
from k3batch.model.kandinsky3.members import FAMILY, MEMBERS
from k3batch.model.member import Family, WeightCheck


class Kandinsky3Family(Family):
    name = FAMILY
    title = "Kandinsky 3"
    members = tuple(MEMBERS.values())
    components = ("unet", "text_encoder", "movq")
    tiny_set = (
        "the whole Kandinsky 3 family (tokenizer, T5, MoVQ, base/Flash/inpainting UNets, a "
        "ControlNet and an IP-Adapter) in either layout"
    )

    def check_model(self, model) -> None:
        if model.ip_adapter is not None and model.ip_adapter.path is None and not model.make_tiny:
            raise ValueError(
                "model.ip_adapter.path: required (the adapter's weights in the fork's layout); "
                "null means the tiny set's, with model.make_tiny only"
            )

    def weight_checks(self, model) -> list[WeightCheck]:
        missing = layout.missing_files(model.path, model.name, model.refine, model.layout)
        note = " with model.refine" if model.refine else ""
        return [WeightCheck("model.path", model.path, tuple(missing), "checkpoint directory", note)]

    def ensure_tiny(self, model) -> None:
        if model.make_tiny:
            from k3batch.testing.tiny import make_tiny

            kind = "reference" if model.layout == "reference" else "diffusers"
            make_tiny(model.path, layout=kind)

    def make_tiny(self, path: str, **options) -> str:
        from k3batch.testing.tiny import make_tiny

        size, kind = options.get("size", "tiny"), options.get("layout", "diffusers")
        path = make_tiny(
            path,
            null_embedding=options.get("null_embedding", True),
            overwrite=True,
            layout=kind,
            size=size,
        )
        return f"{size} Kandinsky 3 family checkpoint ({kind} layout) written to {path}"

    def load(self, model, decode_batch_size: int = 1, text_encoder: bool = True):
        from k3batch.model.kandinsky3.pipeline import Kandinsky3

        self.ensure_tiny(model)
        return Kandinsky3.from_pretrained(
            model.path,
            member=model.name,
            refine=model.refine,
            layout=model.layout,
            dtype=model.dtype.model_dump(),
            device=model.device_map(),
            variant=model.variant,
            decode_batch_size=decode_batch_size,
            performance=model.performance.model_dump(),
            text_encoder=text_encoder,
            lora=[(lora.path, lora.scale) for lora in model.lora],
            controlnet=model.controlnet,
            ip_adapter=layout.ip_adapter_paths(model),
        )

    def load_text_encoder(self, model):
        """T5 alone, for the text encoder pool (`resources.text_encoder_pool`)."""
        from k3batch.model.kandinsky3.prompt_encoder import PromptEncoder

        self.ensure_tiny(model)
        return PromptEncoder.from_pretrained(
            model.path,
            member=model.name,
            layout=model.layout,
            dtype=model.dtype.model_dump(),
            device=model.device_map(),
            variant=model.variant,
            attention=model.performance.attention,
            tf32=model.performance.tf32,
        )

    def loaded_components(self, pipe) -> dict:
        return {
            "unet": pipe.denoiser.unet,
            "refiner_unet": pipe.refiner.unet if pipe.refiner is not None else None,
            "text_encoder": pipe.text_encoder,
            "movq": pipe.movq,
        }

    def label(self, model) -> str:
        refine = "+flash-refiner" if model.refine else ""
        # The file names and scales: the images of a LoRA job are not the checkpoint's alone.
        lora = ",".join(f"{os.path.basename(x.path)}@{x.scale:g}" for x in model.lora)
        lora = f"+lora({lora})" if lora else ""
        # Conditioning models change only the rows that use them, but they are part of the model.
        extra = ""
        if model.controlnet:
            extra += f"+controlnet({model.controlnet})"
        if model.ip_adapter is not None:
            extra += "+ip-adapter({}, {})".format(*layout.ip_adapter_paths(model))
        return f"{model.name}{refine}{lora}{extra}:{model.path}"

    def memory_estimate(self, model, **settings):
        from k3batch.model.kandinsky3.memory import generation_estimate

        return generation_estimate(model, **settings)

    def text_encoder_estimate(self, model, **settings):
        from k3batch.model.kandinsky3.memory import text_encoder_estimate

        return text_encoder_estimate(model, **settings)

    def conditioning(self, model) -> dict:
        # The base member's conditioning models: an edge hint (ControlNet HED), image prompts.
        return {
            "hint": "edge" if model.controlnet else None,
            "ip_images": model.ip_adapter is not None,
        }


KANDINSKY3 = Kandinsky3Family()
