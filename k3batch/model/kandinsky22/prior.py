"""Kandinsky 2.2's prior half of a batch: the image embeddings (and negative image
embeddings) the decoders take, from the rows' prompts or, for `mix` rows, from each row's
mix through `KandinskyV22PriorPipeline.interpolate`; every row with its own generator."""

import torch

from k3batch.model.kandinsky22.inputs import pil


def prompt_embeddings(
    prior_pipe, rows, generators, steps: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings, negative image embeddings) of the rows' prompts, `steps` and `scale`
    the prior's."""
    negatives = None
    if rows[0].negative_prompt is not None:
        negatives = [r.negative_prompt for r in rows]
        # diffusers appends the negatives to the prompts: row i's generator serves both.
        generators = generators + generators
    return prior_pipe(
        [r.prompt for r in rows],
        negative_prompt=negatives,
        num_inference_steps=steps,
        guidance_scale=scale,
        generator=generators,
        output_type="pt",
        return_dict=False,
    )


def mix_embeddings(
    prior_pipe, rows, generators, steps: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mix, as `KandinskyV22PriorPipeline.interpolate` with its generator; a
    negative prompt acts in the prior and gives the negative embedding, as without mix."""
    embeds, negatives = [], []
    for r, g in zip(rows, generators, strict=True):
        out = prior_pipe.interpolate(
            [item if isinstance(item, str) else pil(item) for item, _ in r.mix],
            [float(w) for _, w in r.mix],
            num_inference_steps=steps,
            guidance_scale=scale,
            generator=g,
            negative_prior_prompt=r.negative_prompt,
            negative_prompt="" if r.negative_prompt is None else r.negative_prompt,
        )
        embeds.append(out.image_embeds)
        negatives.append(out.negative_image_embeds)
    return torch.cat(embeds), torch.cat(negatives)
