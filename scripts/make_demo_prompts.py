"""Regenerate data/demo_prompts.parquet, the demo's prompt table (committed to the repo).

Most rows use the job's defaults; a few carry per-row overrides (negative prompt, seed,
size, steps, guidance) so the demo exercises them.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    "A cute corgi lives in a house made out of sushi",
    "a red fox in a snowy birch forest at dawn, soft light",
    "an astronaut riding a horse on the moon, 35mm photo",
    "a lighthouse on a cliff during a thunderstorm, oil painting",
    "a bowl of ramen with steam rising, studio lighting",
    "a cyberpunk street market at night, neon reflections in the rain",
    "a watercolor painting of a quiet Japanese garden in autumn",
    "a tiny robot watering a bonsai tree, isometric 3d render",
    "a medieval castle floating in the clouds, concept art",
    "a portrait of an old fisherman with a white beard, dramatic light",
    "a teapot shaped like a pumpkin, ceramic, product photo",
    "a whale swimming through a sky full of stars",
    "a field of sunflowers under a stormy sky, wide angle",
    "a golden retriever wearing sunglasses at the beach",
    "a cozy reading nook with a cat sleeping on a pile of books",
    "an owl made of stained glass, intricate details",
    "a steam train crossing a stone bridge in the mountains",
    "pixel art of a knight fighting a dragon",
    "a city skyline made of stacked books, surreal",
    "a bicycle leaning on a wall covered in ivy, summer afternoon",
    "an underwater coral reef with colorful fish, sunbeams",
    "a violin resting on sheet music, candle light",
    "a village of mushroom houses in a misty forest",
    "a minimalist poster of a mountain range at sunset",
    "a wizard reading a glowing book in a library tower",
    "a macro photo of a dew drop on a spider web",
    "ukiyo-e print of a great wave and a small boat",
    "a chocolate cake with raspberries, food photography",
    "a snowy cabin with warm windows at night",
    "a desert caravan of camels under a full moon",
    "a hummingbird drinking from a red flower, high speed photo",
    "a futuristic train station with glass domes and plants",
    "Кот в сапогах на рыночной площади, акварель",
    "a paper boat sailing on a rainy street river",
    "a low poly fox sitting on a hill",
    "a portrait of a cat as a renaissance nobleman, oil on canvas",
]

# Per-row overrides for a few rows (None = use the job's default).
OVERRIDES = {
    1: {"negative_prompt": "blurry, low quality"},
    2: {"seed": 42},
    3: {"width": 192, "height": 128},
    4: {"width": 128, "height": 192, "seed": 7},
    5: {"num_inference_steps": 6},
    6: {"guidance_scale": 5.0},
    7: {"negative_prompt": "text, watermark", "seed": 1234},
}


def main() -> None:
    n = len(PROMPTS)
    columns = {
        "id": [f"demo-{i:03d}" for i in range(n)],
        "prompt": PROMPTS,
    }
    types = {
        "negative_prompt": pa.string(),
        "seed": pa.int64(),
        "width": pa.int64(),
        "height": pa.int64(),
        "num_inference_steps": pa.int64(),
        "guidance_scale": pa.float64(),
    }
    arrays = {k: pa.array(v) for k, v in columns.items()}
    for name, type_ in types.items():
        arrays[name] = pa.array([OVERRIDES.get(i, {}).get(name) for i in range(n)], type=type_)
    arrays["source"] = pa.array(["k3batch-demo"] * n)
    out = Path(__file__).resolve().parent.parent / "data" / "demo_prompts.parquet"
    pq.write_table(pa.table(arrays), out)
    print(f"wrote {n} prompts to {out}")


if __name__ == "__main__":
    main()
