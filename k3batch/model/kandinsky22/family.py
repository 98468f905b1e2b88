"""The Kandinsky 2.2 family as k3batch sees it: a CLIP prior and an image-conditioned decoder
(text-to-image, image-to-image, mixing; inpainting; ControlNet depth) on diffusers'
`KandinskyV22*` pipelines. Registered in `k3batch.model.family`."""

from __future__ import annotations

import os

from k3batch.model.kandinsky22 import members as k22
from k3batch.model.kandinsky22.members import FAMILY, MEMBERS
from k3batch.model.member import Family, WeightCheck


class Kandinsky22Family(Family):
    name = FAMILY
    title = "Kandinsky 2.2"
    members = tuple(MEMBERS.values())
    components = ("unet", "text_encoder", "movq", *k22.EXTRA_COMPONENTS)
    model_fields = ("prior_path", "depth_estimator")
    generation_fields = ("prior_num_inference_steps", "prior_guidance_scale")
    own_schedulers = "its own diffusers schedulers (UnCLIP prior, DDPM decoder)"
    no_text_encoder_pool = (
        "'s CLIP text encoder is part of its prior, which runs in the generation actor"
    )
    served_by_member_name = True
    tiny_set = (
        "the Kandinsky 2.2 set (decoder/, decoder-inpaint/, controlnet-depth/, prior/, depth/; "
        "diffusers layout)"
    )

    def check_model(self, model) -> None:
        member = MEMBERS[model.name]
        if "path" not in model.model_fields_set:
            model.path = member.default_path
        refused = [
            ("layout", model.layout == "reference", "loads the diffusers layout only"),
            ("variant", model.variant is not None, "has no weight variants in k3batch"),
            ("lora", bool(model.lora), "takes no LoRA (Kandinsky 3 UNets only)"),
        ]
        for name, bad, why in refused:
            if bad:
                raise ValueError(f"model.{name}: {model.name} {why}; remove it")
        if model.depth_estimator and not member.needs_hint:
            hinted = ", ".join(m.name for m in self.members if m.needs_hint)
            raise ValueError(
                f"model.depth_estimator: only {hinted} estimates depth, not {model.name}; remove it"
            )

    def weight_checks(self, model) -> list[WeightCheck]:
        paths = k22.paths(model)
        checks = [
            WeightCheck(
                "model.path",
                paths["decoder"],
                tuple(k22.missing_parts(paths["decoder"], k22.DECODER_PARTS)),
            ),
            WeightCheck(
                "model.prior_path",
                paths["prior"],
                tuple(k22.missing_parts(paths["prior"], (*k22.PRIOR_PARTS, "scheduler"))),
            ),
        ]
        depth = paths["depth_estimator"]
        if depth:
            missing = () if os.path.isfile(f"{depth}/config.json") else ("config.json",)
            checks.append(WeightCheck("model.depth_estimator", depth, missing))
        return checks

    def ensure_tiny(self, model) -> None:
        if model.make_tiny:
            from k3batch.testing.tiny_k22 import make_tiny_k22

            make_tiny_k22(model.path)

    def make_tiny(self, path: str, **options) -> str:
        from k3batch.testing.tiny_k22 import make_tiny_k22

        path = make_tiny_k22(path)
        return (
            f"tiny Kandinsky 2.2 set (decoder/, decoder-inpaint/, controlnet-depth/, prior/, "
            f"depth/; diffusers layout) written to {path}"
        )

    def load(self, model, decode_batch_size: int = 1, text_encoder: bool = True):
        from k3batch.model.kandinsky22.pipeline import Kandinsky22

        self.ensure_tiny(model)
        paths = k22.paths(model)
        return Kandinsky22.from_pretrained(
            paths["decoder"],
            member=model.name,
            prior_path=paths["prior"],
            depth_estimator=paths["depth_estimator"],
            dtype=model.dtype.model_dump(),
            device=model.device_map(),
            decode_batch_size=decode_batch_size,
            performance=model.performance.model_dump(),
        )

    def label(self, model) -> str:
        paths = k22.paths(model)
        depth = f"+depth({paths['depth_estimator']})" if paths["depth_estimator"] else ""
        return f"{model.name}:{paths['decoder']}+prior({paths['prior']}){depth}"

    def memory_estimate(self, model, **settings):
        from k3batch.model.kandinsky22.memory import generation_estimate

        return generation_estimate(model, **settings)

    def tokenizer_path(self, model) -> str:
        # Prompts go through the prior's CLIP tokenizer.
        return k22.paths(model)["prior"]

    def conditioning(self, model) -> dict:
        member = MEMBERS[model.name]
        return {
            "hint": "depth" if member.needs_hint else None,
            "hint_estimator": model.depth_estimator is not None,
        }


KANDINSKY22 = Kandinsky22Family()
